"""Llama-family decoder (Llama 2/3, Mistral, SmolLM) with a paged KV cache.

Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) are the same network with two switches, so
they subclass this one. q/k/v are one fused linear and gate/up another: fewer, larger matmuls.
The forward has no host syncs and no branching on tensor values, so decode can be captured in
a CUDA graph."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.kernels import fused_ops
from asyncllm.engine.layers.activations import get_act_and_mul
from asyncllm.engine.layers.attention import AttentionBackend, AttentionMetadata
from asyncllm.engine.layers.norms import RMSNorm
from asyncllm.engine.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


def head_dim_of(hf_config: Any) -> int:
    return int(
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )


def num_kv_heads_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


class Attention(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    ):
        super().__init__()
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(hf_config)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.head_dim = head_dim_of(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = hf_config.hidden_size
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.scale = self.head_dim**-0.5
        self.backend = backend
        # Shared by every layer; kept out of this module's state dict.
        self._rotary = (rotary,)

    def forward(
        self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        qkv = self.qkv_proj(x)
        ops = fused_ops(qkv)
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
            out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
            return self.o_proj(out.reshape(-1, self.q_size))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm.plain(q)
            k = self.k_norm.plain(k)
        q, k = self._rotary[0](positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, hf_config: Any):
        super().__init__()
        bias = bool(getattr(hf_config, "mlp_bias", False))
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = get_act_and_mul(getattr(hf_config, "hidden_act", "silu"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, backend, rotary, biases: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = Attention(hf_config, backend, rotary, *biases, qk_norm)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = MLP(hf_config)

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
    def __init__(self, hf_config: Any, backend, biases: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.rotary = RotaryEmbedding(
            head_dim_of(hf_config), int(hf_config.max_position_embeddings), hf_config
        )
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, backend, self.rotary, biases, qk_norm)
            for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

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


# transformers' separate projections -> (our fused parameter, which shard)
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

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend):
        super().__init__()
        self.config = hf_config
        window = getattr(hf_config, "sliding_window", None)
        uses_window = getattr(hf_config, "use_sliding_window", True)
        if window and uses_window and window < hf_config.max_position_embeddings:
            # Full attention instead: identical up to `window` tokens of context, not beyond.
            logger.warning(
                "sliding-window attention (window %d) is not implemented; contexts longer "
                "than the window attend to all tokens",
                window,
            )
        biases = self.attention_biases(hf_config)
        self.model = DecoderModel(hf_config, attn_backend, biases, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)

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
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        packed = getattr(self, "packed_logits", None)  # the CPU's prepacked copy (cpu_linear.py)
        if packed is not None:
            return packed(hidden).float()
        return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load tensors named as transformers names them; q/k/v and gate/up are stacked into the
        fused parameters. Every parameter must be loaded exactly once."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        attn0 = self.model.layers[0].self_attn
        q, kv = attn0.q_size, attn0.kv_size
        inter = self.config.intermediate_size
        offsets = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), 0: (0, inter), 1: (inter, inter)}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, shard = name, None
            for hf_part, (ours, shard_id) in _STACKED.items():
                if f".{hf_part}." in name:
                    target, shard = name.replace(f".{hf_part}.", f".{ours}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                )
            if shard is None:
                dest = param
            else:
                start, size = offsets[shard]
                dest = param.narrow(0, start, size)
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(name if shard is None else f"{target}:{shard}")
        expected = set()
        for pname in params:
            module_name = pname.rpartition(".")[0]
            if module_name.endswith("qkv_proj"):
                expected |= {f"{pname}:{s}" for s in ("q", "k", "v")}
            elif module_name.endswith("gate_up_proj"):
                expected |= {f"{pname}:{s}" for s in (0, 1)}
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}"
            )
