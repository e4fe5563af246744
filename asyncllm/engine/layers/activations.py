"""Gated activations over a fused gate/up projection."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from asyncllm.engine.kernels import fused_ops


class SiluAndMul(nn.Module):
    """x = [gate | up] on the last dim -> silu(gate) * up."""

    def forward(self, x: Tensor) -> Tensor:
        ops = fused_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.silu_and_mul(x.contiguous())  # one kernel (Triton or C) instead of three
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    raise ValueError(f"unsupported hidden_act {name!r}; supported: 'silu'")
