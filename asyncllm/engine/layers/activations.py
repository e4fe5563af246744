"""Gated activations over a fused gate/up projection."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SiluAndMul(nn.Module):
    """x = [gate | up] on the last dim -> silu(gate) * up."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    raise ValueError(f"unsupported hidden_act {name!r}; supported: 'silu'")
