"""Fused elementwise kernels for the decoder layer: RMSNorm (with the residual add), SiLU-and-mul,
and per-head q/k RMSNorm + rotary embedding in one pass.

Why: a decode step is bound by kernel count, not bytes. Written as torch ops, a layer is ~55 small
kernels (RMSNorm alone is 8), each ~2 us even inside a CUDA graph; these three kernels bring it
to ~10. Each reproduces the rounding of the torch code it replaces (the layers' own modules, which
follow transformers): float32 arithmetic, results cast to the model dtype where torch casts them,
so the fused and unfused paths agree to the last bit in float32 and to rounding in bf16.

asyncllm.engine.kernel_paths picks this module for CUDA models when triton imports
(ASYNCLLM_FUSED=0 turns it off; the interpreter tests call the kernels directly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels._common import next_pow2


# ---- RMSNorm with the residual add ----------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)  # torch's add rounds to the model dtype
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = x / tl.sqrt_rn(var + eps)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(x + residual), x + residual) over the last dim of a 2-D x; without a
    residual, x itself is returned as the residual (as the RMSNorm module does)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("rms_norm wants a 2-D x, contiguous in its last dim")
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            out.stride(0),
            res_out.stride(0),
            cols,
            eps,
            HAS_RES=residual is not None,
            BLOCK=next_pow2(cols),
            num_warps=4 if cols <= 4096 else 8,
        )
    return out, res_out


# ---- SiLU(gate) * up ------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim of a 2-D tensor -> silu(gate) * up."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        raise ValueError("silu_and_mul wants a 2-D [T, 2*I] tensor, contiguous in its last dim")
    rows, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, next_pow2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out


# ---- q/k: optional per-head RMSNorm, then the rotary embedding (neox / rotate-half) --------------
@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    qw_ptr,
    kw_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_t,
    stride_cos,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    ROT: tl.constexpr,  # rotated dims (the rest pass through)
    QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # 0..HQ-1: query heads, HQ..HQ+HKV-1: key heads (their order in qkv)
    d = tl.arange(0, DP)
    dmask = d < D
    half: tl.constexpr = ROT // 2
    partner = tl.where(d < half, d + half, d - half)
    src = qkv_ptr + t * stride_t + h * D
    x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=d < ROT, other=0.0).to(tl.float32)
    dt = q_out_ptr.dtype.element_ty
    if QK_NORM:
        if h < HQ:
            w = tl.load(qw_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            wp = tl.load(qw_ptr + partner, mask=d < ROT, other=0.0).to(tl.float32)
        else:
            w = tl.load(kw_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            wp = tl.load(kw_ptr + partner, mask=d < ROT, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
        x = (w * (x * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        # the partner element belongs to the same head: normalised the same way
        xp = (wp * (xp * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d < ROT, other=1.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=d < ROT, other=0.0).to(dt).to(tl.float32)
    rot = tl.where(d < half, -xp, xp)
    a = (x * c).to(dt).to(tl.float32)
    b = (rot * s).to(dt).to(tl.float32)
    y = tl.where(d < ROT, a + b, x).to(dt)
    if h < HQ:
        tl.store(q_out_ptr + (t * HQ + h) * D + d, y, mask=dmask)
    else:
        tl.store(k_out_ptr + (t * HKV + (h - HQ)) * D + d, y, mask=dmask)


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the fused projection qkv [T, (Hq+2Hkv)*D]: q [T,Hq,D] and k [T,Hkv,D], each head
    RMS-normalised (when weights are given, as Qwen3) and rotated at its position. cos/sin are
    the float32 tables [max_positions, rot_dim] (rot_dim <= D, even)."""
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError("qkv must be 2-D and contiguous in its last dim")
    t = qkv.shape[0]
    rot = cos.shape[1]
    if rot > head_dim or rot % 2 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"bad rotary tables {tuple(cos.shape)} for head_dim {head_dim}")
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        norm = q_weight is not None
        _qk_norm_rope_kernel[(t, num_heads + num_kv_heads)](
            qkv,
            positions,
            cos,
            sin,
            q_weight if norm else cos,
            k_weight if norm else cos,
            q,
            k,
            qkv.stride(0),
            cos.stride(0),
            eps,
            HQ=num_heads,
            HKV=num_kv_heads,
            D=head_dim,
            DP=next_pow2(head_dim),
            ROT=rot,
            QK_NORM=norm,
            num_warps=1 if head_dim <= 128 else 2,
        )
    return q, k
