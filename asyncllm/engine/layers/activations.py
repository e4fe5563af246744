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


def get_act_and_mul(name: str, ops: Any = None) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul(ops)
    raise ValueError(f"unsupported hidden_act {name!r}; supported: 'silu'")
