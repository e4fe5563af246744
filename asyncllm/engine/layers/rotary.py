"""Rotary position embeddings (neox / rotate-half layout, as transformers' Llama and Qwen).

The cos/sin table is computed once for every position up to max_position_embeddings, so the
forward is a gather: no host syncs, no branching on tensor values (CUDA-graph safe)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings as one dict with `rope_type` and `rope_theta`, from either layout:
    transformers 5 (`config.rope_parameters`) or older (`rope_theta` + `rope_scaling`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    # Older configs name the kind `type`.
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    out.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    return out


def _inv_freq(dim: int, params: dict[str, Any], hf_config: Any) -> tuple[Tensor, float]:
    """Inverse frequencies [dim/2] and the attention scaling applied to cos/sin."""
    base = float(params["rope_theta"])
    partial = float(params.get("partial_rotary_factor", 1.0))
    rot_dim = int(dim * partial)
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(params["factor"]), 1.0
    if kind == "dynamic":
        # Dynamic NTK changes with the running length; within the original context it equals the
        # default, which is what a fixed table can give (longer contexts drift from transformers).
        return inv, 1.0
    if kind == "llama3":
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # Anything else (yarn, longrope, ...): transformers' own initialiser, if it knows the kind.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {kind!r}")
    inv, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"))
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, hf_config: Any):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        params = rope_parameters(hf_config)
        inv, scaling = _inv_freq(head_dim, params, hf_config)
        self.rot_dim = 2 * inv.numel()
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]  # [P, rot/2], float32 as transformers
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q [T,Hq,D], k [T,Hk,D] rotated at `positions` [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _apply(q, cos, sin, self.rot_dim), _apply(k, cos, sin, self.rot_dim)


def _apply(x: Tensor, cos: Tensor, sin: Tensor, rot_dim: int) -> Tensor:
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if rot_dim < x.shape[-1]:
        xr, rest = x[..., :rot_dim], x[..., rot_dim:]
        return torch.cat([_rotate(xr, cos, sin), rest], dim=-1)
    return _rotate(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
