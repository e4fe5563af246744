"""Gemma 2 and Gemma 3 (text) over the paged KV cache.

What sets them apart from Llama, all per transformers' modeling_gemma2/3:
- RMSNorm scales by (1 + w), computed in float32 (GemmaRMSNorm);
- four norms per layer: before and after attention, before and after the MLP (the "post" norms
  are applied to the branch before it joins the residual);
- GeGLU with the tanh GELU; embeddings scaled by sqrt(hidden_size) (in the weights' dtype);
- attention scale query_pre_attn_scalar**-0.5, not head_dim**-0.5;
- interleaved local (sliding-window) and global layers from `config.layer_types`;
- Gemma 2: attention logits soft-capped (attn_logit_softcapping) and final logits too
  (final_logit_softcapping);
- Gemma 3: q/k RMSNorm per head, and its own rope base for local layers (rope_parameters per
  layer type); transformers' Gemma 3 does not cap attention logits, so neither do we.

The parts are Llama's where they can be (merged q/k/v and gate/up linear layers, the weight
loading); the factories (`make_attention`, `make_mlp`, `make_layer`) build Gemma's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.kernel_paths import KernelPaths
from asyncllm.engine.layers.activations import get_act_and_mul
from asyncllm.engine.layers.attention import AttentionMetadata
from asyncllm.engine.layers.linear import QuantizationConfig
from asyncllm.engine.layers.rotary import RotaryEmbedding
from asyncllm.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from asyncllm.engine.models import sliding_windows
from asyncllm.engine.models.llama import _STACKED, MLP, Attention, head_dim_of
from asyncllm.engine.models.weights import load_weights


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in float32, cast back to x's dtype (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)

    plain = forward  # as RMSNorm.plain: no residual


class GemmaAttention(Attention):
    """Llama's attention with Gemma's scale, (1 + w) q/k norms, a soft cap and a window. The
    fused q/k-norm + rope kernel assumes a plain RMSNorm weight, so the torch path runs."""

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        prefix: str,
        *,
        softcap: float | None,
        qk_norm: bool,
        **kwargs: Any,
    ):
        super().__init__(hf_config, layer_idx, prefix, qk_norm=False, **kwargs)
        eps = hf_config.rms_norm_eps
        self.q_norm = GemmaRMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, eps) if qk_norm else None
        self.scale = float(hf_config.query_pre_attn_scalar) ** -0.5
        self.softcap = softcap
        self.ops = None

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotary[0](positions, q, k)
        out = self.backend.forward(
            q,
            k,
            v,
            kv_cache,
            meta,
            self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.softcap,
        )
        return self.o_proj(out.reshape(-1, self.q_size))


class GemmaMLP(MLP):
    """Llama's merged gate/up MLP with Gemma's activation (`hidden_activation`: tanh GELU)."""

    def __init__(self, hf_config: Any, prefix: str, **kwargs: Any):
        super().__init__(hf_config, prefix, **kwargs)
        act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
        self.act = get_act_and_mul(act)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, layer_idx: int, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        h, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = attention
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = mlp
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaModel(nn.Module):
    def __init__(self, hf_config: Any, rotaries: list[RotaryEmbedding], layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            hf_config.vocab_size, hf_config.hidden_size, prefix="model.embed_tokens"
        )
        self.embed_scale = float(hf_config.hidden_size) ** 0.5
        self.rotaries = nn.ModuleList(rotaries)
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], meta: AttentionMetadata
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        # transformers multiplies by the scale in the weights' dtype (sqrt(3072) is 55.5 in bf16)
        x = x * float(torch.tensor(self.embed_scale, dtype=x.dtype))
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(positions, x, cache, meta)
        return self.norm(x)


class Gemma2ForCausalLM(nn.Module):
    qk_norm = False

    def __init__(
        self,
        hf_config: Any,
        kernels: KernelPaths,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__()
        self.config = hf_config
        self.kernels = kernels
        self.quant_config = quant_config
        self._windows = sliding_windows(hf_config)
        n = int(hf_config.num_hidden_layers)
        self._types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * n)
        # One rotary table per layer type with rope settings of its own (Gemma 3's local layers
        # have another base); otherwise one for all.
        params = getattr(hf_config, "rope_parameters", None)
        per_type = isinstance(params, dict) and all(t in params for t in self._types)
        head_dim, max_pos = head_dim_of(hf_config), int(hf_config.max_position_embeddings)
        rotaries = {
            t: RotaryEmbedding(head_dim, max_pos, hf_config, t if per_type else None)
            for t in sorted(set(self._types))
        }
        self._rotaries = rotaries  # for the factories; owned (and listed) by self.model
        layers = [self.make_layer(hf_config, i, f"model.layers.{i}") for i in range(n)]
        self.model = GemmaModel(hf_config, list(rotaries.values()), layers)
        self.final_softcap = getattr(hf_config, "final_logit_softcapping", None)
        tied = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            quant_config=quant_config,
            prefix="lm_head",
            tie_to=self.model.embed_tokens if tied else None,
        )

    @staticmethod
    def attention_soft_cap(hf_config: Any) -> float | None:
        return getattr(hf_config, "attn_logit_softcapping", None)

    # ---- the parts of one decoder layer -----------------------------------------------------
    def make_layer(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        return GemmaDecoderLayer(
            hf_config,
            layer_idx,
            self.make_attention(hf_config, layer_idx, f"{prefix}.self_attn"),
            self.make_mlp(hf_config, layer_idx, f"{prefix}.mlp"),
        )

    def make_attention(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return GemmaAttention(
            hf_config,
            layer_idx,
            prefix,
            softcap=self.attention_soft_cap(hf_config),
            qk_norm=self.qk_norm,
            kernels=self.kernels,
            rotary=self._rotaries[self._types[layer_idx]],
            quant_config=self.quant_config,
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=self._windows[layer_idx],
        )

    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        return GemmaMLP(hf_config, prefix, ops=None, quant_config=self.quant_config)

    # ---- running -------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], meta: AttentionMetadata
    ) -> Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        def skip(name: str) -> bool:
            return "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head.tied)

        load_weights(self, weights, _STACKED, skip)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True

    @staticmethod
    def attention_soft_cap(hf_config: Any) -> float | None:
        return None  # transformers' Gemma 3 attention does not apply attn_logit_softcapping
