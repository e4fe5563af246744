"""Triton dynamic per-token fp8 (e4m3) quantization of activations: one program per row reads
it once for the absolute maximum and once more to scale and round (the torch version is five
kernels per linear layer, which a decode step of 128 linears feels). Reference:
kernels.reference.per_token_fp8_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels._common import interpreting

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FMAX: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FMAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FMAX, FMAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    # The interpreter rounds float32 -> e4m3 wrongly (triton 3.9: -127.1 became -64): there
    # the kernel writes the scaled float32 values and torch rounds them.
    out_dtype = torch.float32 if interpreting() else torch.float8_e4m3fn
    q = torch.empty(m, k, device=x.device, dtype=out_dtype)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _per_token_fp8_kernel[(m,)](
            x, q, s, k, x.stride(0), q.stride(0), FMAX=FP8_MAX, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    return q.to(torch.float8_e4m3fn), s
