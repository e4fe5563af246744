"""Triton weight-only quantized GEMMs: y[M, N] = x[M, K] @ W^T with W dequantized in registers.

Two weight decoders share one tiled kernel (tl.dot on the activation dtype, float32
accumulation):
- int4 (GPTQ and AWQ, both repacked at load to one layout): `qweight` int32 [K/8, N], input
  8r+j in bits 4j.. of row r; per group of `group_size` inputs an fp16 scale and a uint8 zero
  per output: w = (q - zero) * scale. A K tile never straddles a group (BLOCK_K divides it).
- fp8 e4m3 with block scales (HF "fp8" checkpoints, `weight_block_size`): W fp8 [N, K] as
  stored, `scale_inv` float32 [ceil(N/bn), ceil(K/bk)]: w = W * scale_inv[n // bn, k // bk].

Below DEQUANT_MIN_M rows the small-batch kernels of kernels/quant_gemv.py run (an int4 GEMV
up to quant_gemv.GEMV_MAX_M rows, an int4 tl.dot kernel above; the fp8 GEMV up to
quant_gemv.FP8_GEMV_MAX_M rows, this module's tile kernel above). `legacy=True` (the engine:
ASYNCLLM_QUANT_KERNELS=tile) keeps the first version for every size below DEQUANT_MIN_M: this
module's tile kernel, which splits K for small batches into a float32 buffer summed afterwards.
From DEQUANT_MIN_M rows (large prefills, compute-bound) the weight is dequantized by a second
kernel into a transient copy and the GEMM is cuBLAS's. References in kernels/reference.py;
tests run the kernels under TRITON_INTERPRET=1 and on the GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels import quant_gemv
from asyncllm.engine.kernels._common import interpreting

INT4, FP8_BLOCK = 0, 1


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, GROUP_K, GROUP_N, K_TILES,
    stride_xm, stride_xk, stride_wa, stride_wb, stride_sa, stride_sb,
    stride_za, stride_zb, stride_ys, stride_ym, stride_yn,
    KIND: tl.constexpr, SPLIT_K: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k, K_TILES, SPLIT_K):
        k0 = t * BLOCK_K
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if KIND == 0:
            # [BLOCK_K, BLOCK_N] words (each loaded 8 times from cache), then each k's nibble.
            words = tl.load(
                w_ptr + (kk // 8)[:, None] * stride_wa + offs_n[None, :] * stride_wb,
                mask=k_ok[:, None] & n_ok[None, :],
                other=0,
            )
            q = ((words >> ((kk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
            g = k0 // GROUP_K
            s = tl.load(s_ptr + g * stride_sa + offs_n * stride_sb, mask=n_ok, other=0.0)
            z = tl.load(z_ptr + g * stride_za + offs_n * stride_zb, mask=n_ok, other=0)
            w = (q - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        else:
            wq = tl.load(
                w_ptr + offs_n[None, :] * stride_wa + kk[:, None] * stride_wb,
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            s = tl.load(
                s_ptr + (offs_n // GROUP_N) * stride_sa + (k0 // GROUP_K) * stride_sb,
                mask=n_ok,
                other=0.0,
            )
            w = wq.to(tl.float32) * s[None, :]
        if FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP_K, GROUP_N,
    stride_wa, stride_wb, stride_sa, stride_sb, stride_za, stride_zb, stride_ok, stride_on,
    KIND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """W as the GEMM kernel decodes it, written out: [K, N] (int4) or [N, K] (fp8 blocks),
    addressed through (stride_ok, stride_on) either way."""
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (kk < K)[:, None] & (nn < N)[None, :]
    if KIND == 0:
        words = tl.load(w_ptr + (kk // 8)[:, None] * stride_wa + nn[None, :] * stride_wb,
                        mask=ok, other=0)  # fmt: skip
        q = ((words >> ((kk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        g = (kk // GROUP_K)[:, None]
        s = tl.load(s_ptr + g * stride_sa + nn[None, :] * stride_sb, mask=ok, other=0.0)
        z = tl.load(z_ptr + g * stride_za + nn[None, :] * stride_zb, mask=ok, other=0)
        w = (q - z.to(tl.float32)) * s.to(tl.float32)
    else:
        wq = tl.load(w_ptr + nn[None, :] * stride_wa + kk[:, None] * stride_wb, mask=ok, other=0.0)
        s = tl.load(
            s_ptr + (nn // GROUP_N)[None, :] * stride_sa + (kk // GROUP_K)[:, None] * stride_sb,
            mask=ok,
            other=0.0,
        )
        w = wq.to(tl.float32) * s
    out = out_ptr + kk[:, None] * stride_ok + nn[None, :] * stride_on
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=ok)


# From this many rows (a large prefill), writing W out in the activation dtype and handing the
# GEMM to cuBLAS beats the tiled kernel: the GEMM is compute-bound and the extra ~4 bytes per
# weight of the dequantized copy cost a few percent of it.
DEQUANT_MIN_M = 1024


def dequantize(kind, w, s, z, n, k, group_k, group_n, dtype, transposed) -> torch.Tensor:
    """The weight the kernel would use, in `dtype`: [K, N] (int4) or [N, K] (fp8 blocks)."""
    out = torch.empty((n, k) if transposed else (k, n), device=w.device, dtype=dtype)
    sok, son = (out.stride(1), out.stride(0)) if transposed else out.stride()
    bk, bn = 64, 64
    _dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        w, s, z, out, n, k, group_k, group_n, *w.stride(), *s.stride(),
        *(z.stride() if z.dim() == 2 else (0, 0)), sok, son,
        KIND=kind, BLOCK_K=bk, BLOCK_N=bn,
    )  # fmt: skip
    return out


@lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiles(m: int, n: int, k: int, group_k: int, device: torch.device) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps): BLOCK_K divides the K group; small M
    splits K until the grid has about two programs per SM."""
    block_k = math.gcd(group_k, 128)
    if block_k < 16:
        raise ValueError(f"group size {group_k} has no K tile of at least 16 inputs")
    if m <= 16:
        bm, bn, warps = 16, 64, 4
    elif m <= 64:
        bm, bn, warps = 32, 64, 4
    else:
        bm, bn, warps = 64, 128, 8
        block_k = min(block_k, 64)
    k_tiles = -(-k // block_k)
    split = 1
    if m <= 64 and device.type == "cuda":
        tiles = -(-m // bm) * -(-n // bn)
        split = max(1, min(2 * _num_sms(device.index or 0) // tiles, k_tiles, 16))
    return bm, bn, block_k, split, warps


def _launch(x, w, s, z, kind, n, k, group_k, group_n, strides_w, strides_s, strides_z):
    out_shape = (*x.shape[:-1], n)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    fp32 = x.dtype == torch.float32 or interpreting()
    bm, bn, bk, split, warps = _tiles(m, n, k, group_k, x.device)
    if split > 1:
        y = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(1, m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return torch.empty(out_shape, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _quant_gemm_kernel[grid](
        x2, w, s, z, y,
        m, n, k, group_k, group_n, triton.cdiv(k, bk),
        x2.stride(0), x2.stride(1), *strides_w, *strides_s, *strides_z,
        y.stride(0), y.stride(1), y.stride(2),
        KIND=kind, SPLIT_K=split, FP32=fp32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    out = y.sum(0).to(x.dtype) if split > 1 else y[0]
    return out.reshape(out_shape)


def int4_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, legacy: bool = False,
) -> torch.Tensor:  # fmt: skip
    """x [..., K] @ dequant(qweight [K/8, N] int32, scales [G, N], zeros [G, N] uint8).
    `legacy`: the tile kernel below DEQUANT_MIN_M rows (the A/B switch)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if (
        x.shape[-1] != k
        or k % group_size
        or scales.shape != (k // group_size, n)
        or zeros.shape != scales.shape
    ):
        raise ValueError(
            f"int4_gemm: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, scales "
            f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group size {group_size} do not "
            "fit together"
        )
    if x.numel() // k >= DEQUANT_MIN_M:
        w = dequantize(INT4, qweight, scales, zeros, n, k, group_size, 1, x.dtype, False)
        return x @ w
    if not legacy:
        x2 = x.reshape(-1, k)
        fp32 = x.dtype == torch.float32 or interpreting()
        y = quant_gemv.int4_gemm_small(x2, qweight, scales, zeros, group_size, fp32)
        return y.reshape(*x.shape[:-1], n)
    return _launch(
        x, qweight, scales, zeros, INT4, n, k, group_size, 1,
        qweight.stride(), scales.stride(), zeros.stride(),
    )  # fmt: skip


def fp8_block_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    legacy: bool = False,
) -> torch.Tensor:
    """x [..., K] @ (weight fp8 [N, K] * scale_inv [ceil(N/bn), ceil(K/bk)] per block)^T.
    Up to quant_gemv.FP8_GEMV_MAX_M rows (and not `legacy`): the fp8 GEMV."""
    n, k = weight.shape
    bn, bk = block
    if x.shape[-1] != k or scale_inv.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(
            f"fp8_block_gemm: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scales "
            f"{tuple(scale_inv.shape)}, block {block} do not fit together"
        )
    if x.numel() // k >= DEQUANT_MIN_M:
        w = dequantize(FP8_BLOCK, weight, scale_inv, scale_inv, n, k, bk, bn, x.dtype, True)
        return torch.nn.functional.linear(x, w)
    if not legacy and 0 < x.numel() // k <= quant_gemv.FP8_GEMV_MAX_M:
        y = quant_gemv.fp8_gemv(x.reshape(-1, k), weight, scale_inv, (bn, bk))
        return y.reshape(*x.shape[:-1], n)
    return _launch(
        x, weight, scale_inv, scale_inv, FP8_BLOCK, n, k, bk, bn,
        weight.stride(), scale_inv.stride(), (0, 0),
    )  # fmt: skip
