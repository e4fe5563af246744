"""Rotary position embeddings (neox / rotate-half layout, as transformers' Llama and Qwen).

The cos/sin table is computed once for every position up to max_position_embeddings, so the
forward is a gather: no host syncs, no branching on tensor values (CUDA-graph safe)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope settings as one dict with `rope_type` and `rope_theta`, from either layout:
    transformers 5 (`config.rope_parameters`, per layer type for Gemma 3: `layer_type` picks
    one) or older (`rope_theta` + `rope_scaling`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    # Older configs name the kind `type`.
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    out.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    out.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    return out


def _inv_freq(
    dim: int,
    params: dict[str, Any],
    hf_config: Any,
    layer_type: str | None = None,
    max_model_len: int | None = None,
) -> tuple[Tensor, float]:
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

    if kind in ("su", "yarn") and "short_factor" in params:
        kind = "longrope"  # Phi-3's older names for it
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {kind!r}")
    kwargs: dict[str, Any] = {}
    if layer_type is not None and isinstance(getattr(hf_config, "rope_parameters", None), dict):
        if layer_type in hf_config.rope_parameters:
            kwargs["layer_type"] = layer_type
    if kind == "longrope":
        # transformers picks the long factors once the sequence outgrows the original context
        # (and keeps keys rotated with the short ones in its cache). A table must pick one set
        # for every position, or rotations within one sequence disagree: the long set when
        # the engine may run past the original context (max_model_len), else the short set.
        kwargs["seq_len"] = max_model_len
    inv, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"), **kwargs)
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """`layer_type` picks per-layer-type settings (Gemma 3's local and global rope bases);
    `max_model_len` decides longrope's factor set (see _inv_freq). The loader rebuilds the
    tables after building the model on the meta device (loader._rebuild_buffers)."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        hf_config: Any,
        layer_type: str | None = None,
        max_model_len: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.layer_type = layer_type
        # Computed on the CPU even when the model is being built on the meta device: an
        # initialiser that creates a tensor without a device and then moves it (transformers'
        # yarn, longrope, ...) fails there ("Cannot copy out of meta tensor").
        with torch.device("cpu"):
            params = rope_parameters(hf_config, layer_type)
            inv, scaling = _inv_freq(head_dim, params, hf_config, layer_type, max_model_len)
            self.rot_dim = 2 * inv.numel()
            pos = torch.arange(max_positions, dtype=torch.float32)
            freqs = pos[:, None] * inv[None, :]  # [P, rot/2], float32 as transformers
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos() * scaling, emb.sin() * scaling
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

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
