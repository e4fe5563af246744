"""RMSNorm, with the residual add fused in (one pass instead of two in the decoder layer).

`ops`: the fused-op module chosen at start-up (asyncllm.engine.kernel_paths: Triton on CUDA, C on
the CPU in float32), or None for the torch ops below."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, ops: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def _norm(self, x: Tensor) -> Tensor:
        # float32 statistics and the cast back before the weight, exactly as transformers does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (norm(x + residual), x + residual); without a residual, x is the residual."""
        ops = self.ops
        if (
            ops is not None
            and x.dim() == 2
            and self.weight.dtype == x.dtype
            and (residual is None or residual.dtype == x.dtype)
        ):
            # one kernel instead of eight (kernels.fused on CUDA, kernels.cpu_fused on the CPU)
            return ops.rms_norm(x.contiguous(), self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        return self._norm(x), x

    def plain(self, x: Tensor) -> Tensor:
        return self._norm(x)
