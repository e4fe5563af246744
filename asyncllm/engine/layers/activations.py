"""Gated activations over a fused gate/up projection."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class SiluAndMul(nn.Module):
    """x = [gate | up] on the last dim -> silu(gate) * up. `ops`: the fused-op module chosen at
    start-up (asyncllm.engine.kernel_paths), or None for the torch ops."""

    def __init__(self, ops: Any = None):
        super().__init__()
        self.ops = ops

    def forward(self, x: Tensor) -> Tensor:
        ops = self.ops
        if ops is not None and x.dim() == 2:
            return ops.silu_and_mul(x.contiguous())  # one kernel (Triton or C) instead of three
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """x = [gate | up] on the last dim -> gelu(gate) * up (GeGLU; Gemma's tanh approximation).
    Torch ops only (no fused kernel for it yet)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


_ACTS: dict[str, Any] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu": lambda ops: GeluAndMul("none"),
    "gelu_pytorch_tanh": lambda ops: GeluAndMul("tanh"),
    "gelu_new": lambda ops: GeluAndMul("tanh"),
}


def get_act_and_mul(name: str, ops: Any = None) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(_ACTS)}")
    return _ACTS[name](ops)
