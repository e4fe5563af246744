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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.layers.activations import get_act_and_mul
from asyncllm.engine.layers.attention import AttentionBackend, AttentionMetadata
from asyncllm.engine.layers.rotary import RotaryEmbedding
from asyncllm.engine.models import sliding_windows
from asyncllm.engine.models.llama import LlamaForCausalLM, head_dim_of, num_kv_heads_of


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


class GemmaAttention(nn.Module):
    def __init__(
        self,
        cfg: Any,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        sliding_window: int | None,
        qk_norm: bool,
        softcap: float | None,
    ):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(cfg)
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.backend = backend
        self._rotary = (rotary,)  # shared; kept out of this module's state dict

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
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


class GemmaMLP(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu")
        self.act = get_act_and_mul(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, attn: GemmaAttention):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = attn
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaModel(nn.Module):
    def __init__(self, cfg: Any, backend: AttentionBackend, qk_norm: bool, softcap: float | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = float(cfg.hidden_size) ** 0.5
        windows = sliding_windows(cfg)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(windows)
        head_dim, max_pos = head_dim_of(cfg), int(cfg.max_position_embeddings)
        # One rotary table per layer type that has its own rope settings (Gemma 3's local
        # layers use another base); Gemma 2 has one for all.
        per_type = isinstance(getattr(cfg, "rope_parameters", None), dict) and all(
            t in cfg.rope_parameters for t in set(types)
        )
        rotaries = {
            t: RotaryEmbedding(head_dim, max_pos, cfg, t if per_type else None) for t in set(types)
        }
        self.rotaries = nn.ModuleList(rotaries[t] for t in sorted(rotaries))
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(
                cfg, GemmaAttention(cfg, backend, rotaries[t], window, qk_norm, softcap)
            )
            for t, window in zip(types, windows, strict=True)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend):
        super().__init__()
        self.config = hf_config
        softcap = self.attention_soft_cap(hf_config)
        self.model = GemmaModel(hf_config, attn_backend, self.qk_norm, softcap)
        self.final_softcap = getattr(hf_config, "final_logit_softcapping", None)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        )

    @staticmethod
    def attention_soft_cap(hf_config: Any) -> float | None:
        return getattr(hf_config, "attn_logit_softcapping", None)

    def forward(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], meta: AttentionMetadata
    ) -> Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = LlamaForCausalLM.compute_logits(self, hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        # The same names and stacking as Llama's (q/k/v and gate/up into the fused layers).
        LlamaForCausalLM.load_weights(self, weights)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True

    @staticmethod
    def attention_soft_cap(hf_config: Any) -> float | None:
        return None  # transformers' Gemma 3 attention does not apply attn_logit_softcapping
