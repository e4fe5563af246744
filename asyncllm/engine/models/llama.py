"""Llama-family decoder (Llama 2/3, Mistral, SmolLM) with a paged KV cache.

The model class is a set of factories: `make_attention` and `make_mlp` build one layer's parts
(given the config, the layer index and the parameter prefix), so a different attention (sliding
window, another norm) or MLP (MoE) is a different part, chosen by a subclass, never an `if` in
here. Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) subclass this one. Every projection is
a linear layer of asyncllm.engine.layers.linear (q/k/v one merged matmul, gate/up another), so a
quantized checkpoint's linear method plugs in without touching this file. The forward has no
host syncs and no branching on tensor values, so decode can be captured in a CUDA graph."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.kernel_paths import KernelPaths
from asyncllm.engine.layers.activations import get_act_and_mul
from asyncllm.engine.layers.attention import AttentionMetadata
from asyncllm.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    QuantizationConfig,
    RowParallelLinear,
)
from asyncllm.engine.layers.norms import RMSNorm
from asyncllm.engine.layers.rotary import RotaryEmbedding
from asyncllm.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from asyncllm.engine.models import sliding_windows
from asyncllm.engine.models.weights import load_weights

logger = logging.getLogger(__name__)


def head_dim_of(hf_config: Any) -> int:
    return int(
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )


def num_kv_heads_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


class Attention(nn.Module):
    """Full causal self-attention over the paged cache: merged q/k/v, optional per-head q/k
    RMSNorm, rotary, the chosen backend, o_proj."""

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        prefix: str,
        *,
        kernels: KernelPaths,
        rotary: RotaryEmbedding,
        quant_config: QuantizationConfig | None,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window  # None: the whole context
        total_heads, total_kv = hf_config.num_attention_heads, num_kv_heads_of(hf_config)
        if total_heads % total_kv:
            raise ValueError(
                f"num_attention_heads ({total_heads}) must be a multiple of "
                f"num_key_value_heads ({total_kv})"
            )
        self.head_dim = head_dim_of(hf_config)
        hidden = hf_config.hidden_size
        self.qkv_proj = QKVParallelLinear(
            hidden,
            self.head_dim,
            total_heads,
            total_kv,
            bias=qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim,
            hidden,
            bias=o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        ops = kernels.fused
        eps = hf_config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps, ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, ops) if qk_norm else None
        self.scale = self.head_dim**-0.5
        self.backend = kernels.attention
        self.ops = ops
        # Shared by every layer; kept out of this module's state dict.
        self._rotary = (rotary,)

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        qkv = self.qkv_proj(x)
        ops = self.ops
        if ops is not None and qkv.dim() == 2:
            # q/k norm and rotary in one kernel (kernels.fused; on the CPU kernels.cpu_fused, in place)
            rope = self._rotary[0]
            norm = self.q_norm is not None
            q, k = ops.qk_norm_rope(
                qkv,
                positions,
                rope.cos,
                rope.sin,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.q_norm.weight if norm else None,
                self.k_norm.weight if norm else None,
                self.q_norm.eps if norm else 0.0,
            )
            v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
            out = self.backend.forward(
                q, k, v, kv_cache, meta, self.scale, sliding_window=self.sliding_window
            )
            return self.o_proj(out.reshape(-1, self.q_size))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm.plain(q)
            k = self.k_norm.plain(k)
        q, k = self._rotary[0](positions, q, k)
        out = self.backend.forward(
            q, k, v, kv_cache, meta, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """The dense gated MLP: merged gate/up, activation-and-multiply, down."""

    def __init__(
        self,
        hf_config: Any,
        prefix: str,
        *,
        ops: Any,
        quant_config: QuantizationConfig | None,
    ):
        super().__init__()
        bias = bool(getattr(hf_config, "mlp_bias", False))
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden,
            [inter, inter],
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            inter, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.act = get_act_and_mul(getattr(hf_config, "hidden_act", "silu"), ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block around the parts it is given: `self_attn(positions, h, cache,
    meta)` and `mlp(h)`."""

    def __init__(
        self, hf_config: Any, layer_idx: int, attention: nn.Module, mlp: nn.Module, ops: Any
    ):
        super().__init__()
        self.layer_idx = layer_idx
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps, ops)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps, ops)
        self.mlp = mlp

    def forward(
        self,
        positions: Tensor,
        x: Tensor,
        residual: Tensor | None,
        kv_cache: Tensor,
        meta: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, hf_config: Any, rotary: RotaryEmbedding, layers: list[nn.Module], ops: Any):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            hf_config.vocab_size, hf_config.hidden_size, prefix="model.embed_tokens"
        )
        self.rotary = rotary
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, ops)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[Tensor],
        meta: AttentionMetadata,
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, cache, meta)
        x, _ = self.norm(x, residual)
        return x


# transformers' separate projections -> (our merged parameter, which shard)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    @staticmethod
    def attention_biases(hf_config: Any) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        bias = bool(getattr(hf_config, "attention_bias", False))
        return bias, bias

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
        self._windows = sliding_windows(hf_config)  # per layer, for make_attention
        rotary = RotaryEmbedding(
            head_dim_of(hf_config), int(hf_config.max_position_embeddings), hf_config
        )
        self._rotary = (rotary,)  # for the factories; owned (and listed) by self.model
        layers = [
            self.make_layer(hf_config, i, f"model.layers.{i}")
            for i in range(hf_config.num_hidden_layers)
        ]
        self.model = DecoderModel(hf_config, rotary, layers, kernels.fused)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            quant_config=quant_config,
            prefix="lm_head",
            tie_to=self.model.embed_tokens if self.tie_word_embeddings else None,
        )

    # ---- the parts of one decoder layer (override in a subclass for other parts) ----------
    def make_layer(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        return DecoderLayer(
            hf_config,
            layer_idx,
            self.make_attention(hf_config, layer_idx, f"{prefix}.self_attn"),
            self.make_mlp(hf_config, layer_idx, f"{prefix}.mlp"),
            self.kernels.fused,
        )

    def make_attention(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        qkv_bias, o_bias = self.attention_biases(hf_config)
        return Attention(
            hf_config,
            layer_idx,
            prefix,
            kernels=self.kernels,
            rotary=self._rotary[0],
            quant_config=self.quant_config,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=self.qk_norm,
            sliding_window=self._windows[layer_idx],
        )

    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        return MLP(hf_config, prefix, ops=self.kernels.fused, quant_config=self.quant_config)

    # ---- running -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[Tensor],
        meta: AttentionMetadata,
    ) -> Tensor:
        """input_ids/positions [T] -> final hidden states [T, H]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> float32 logits [N, V]."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load tensors named as transformers names them, each through its parameter's
        weight_loader: separate q/k/v and gate/up by shard id, fused-on-disk ones whole."""

        def skip(name: str) -> bool:
            # rotary tables are computed; a tied head is the embedding
            return "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head.tied)

        load_weights(self, weights, _STACKED, skip)
