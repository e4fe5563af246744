"""Fused elementwise kernels for the decoder layer on the CPU (float32): residual-add RMSNorm,
SiLU-and-mul, q/k (RMSNorm +) rotary in place, and the KV cache write.

The CPU counterpart of asyncllm.engine.kernels.fused (Triton), with the same functions and
signatures, so the layers take either (chosen once by asyncllm.engine.kernel_paths). Written as torch ops these are ~25
small ops per layer at batch 64 (each a pass over memory plus ~10 us of dispatch); the C code
(`cpu_fused.c`, next to this file, built and loaded like the decode attention kernel by
asyncllm.engine.kernels._cpu_build) does each in one pass over rows that are in cache.

Rounding: float32 throughout, with -ffp-contract=off, so rotary, SiLU-and-mul's multiply and the
KV write give torch's bits; RMSNorm's sum of squares and SiLU's exp round differently from
torch's (float32 tolerance, not bits).

`available(x)` says whether to use them: a CPU float32 tensor, `ASYNCLLM_CPU_FUSED` not `0` and
the library built (no compiler or a failed build: logged once, and the layers keep their torch
ops). The engine asks once, at start-up (asyncllm.engine.kernel_paths).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import Tensor

from asyncllm import envs
from asyncllm.engine.kernels import _cpu_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_fused.c")
CFLAGS = [*_cpu_build.CFLAGS, "-ffp-contract=off"]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.asyncllm_add_rms_norm_f32.argtypes = [p, i64, p, i64, p, i64, p, i64, p, i64, i64, f32]
    lib.asyncllm_add_rms_norm_f32.argtypes += [i32]
    lib.asyncllm_add_rms_norm_f32.restype = None
    lib.asyncllm_silu_and_mul_f32.argtypes = [p, i64, p, i64, i64, i64, i32]
    lib.asyncllm_silu_and_mul_f32.restype = None
    fn = lib.asyncllm_qk_norm_rope_f32
    fn.argtypes = [p, i64, i32, p, i64, i32, p, p, p, i64, i64, p, p, f32, i32, i32, i64, i32]
    fn.restype = ctypes.c_int
    lib.asyncllm_write_kv_f32.argtypes = [p, i64, p, i64, p, i64, i64, p, i64, i32]
    lib.asyncllm_write_kv_f32.restype = ctypes.c_int


_library = _cpu_build.CLibrary(SOURCE, "CPU fused kernels", _declare, logger, CFLAGS)


def enabled() -> bool:
    return envs.cpu_fused()


def load() -> ctypes.CDLL | None:
    return _library.load()


def reset() -> None:
    _library.reset()


def available(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and enabled()
        and _library.load() is not None
    )


def _f32(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _rows(t: Tensor) -> Tensor:
    """2-D with unit stride in the last dim (a copy only when it is not)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(weight * norm(x + residual), x + residual) over the last dim of a 2-D x; without a
    residual, x itself is returned as the residual (as the RMSNorm module does)."""
    if x.dim() != 2 or not _f32(x) or not _f32(weight) or weight.numel() != x.shape[1]:
        raise ValueError("rms_norm wants a 2-D float32 CPU x and a float32 weight [cols]")
    if residual is not None and (residual.shape != x.shape or not _f32(residual)):
        raise ValueError("residual must be float32 and shaped like x")
    x = _rows(x)
    weight = weight.contiguous()
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    if residual is not None:
        residual = _rows(residual)
        res_out = torch.empty(rows, cols, dtype=torch.float32)
    else:
        res_out = x
    if rows and cols:
        _library.load().asyncllm_add_rms_norm_f32(
            out.data_ptr(),
            cols,
            res_out.data_ptr() if residual is not None else None,
            cols,
            x.data_ptr(),
            x.stride(0),
            residual.data_ptr() if residual is not None else None,
            residual.stride(0) if residual is not None else 0,
            weight.data_ptr(),
            rows,
            cols,
            eps,
            torch.get_num_threads(),
        )
    return out, res_out


def silu_and_mul(x: Tensor) -> Tensor:
    """x = [gate | up] on the last dim of a 2-D x -> silu(gate) * up."""
    if x.dim() != 2 or x.shape[1] % 2 or not _f32(x):
        raise ValueError("silu_and_mul wants a 2-D float32 CPU x with an even last dim")
    x = _rows(x)
    rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, d, dtype=torch.float32)
    if rows and d:
        _library.load().asyncllm_silu_and_mul_f32(
            out.data_ptr(), d, x.data_ptr(), x.stride(0), rows, d, torch.get_num_threads()
        )
    return out


def qk_norm_rope(
    qkv: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: Tensor | None = None,
    k_weight: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """From the fused projection qkv [T, (Hq+2Hkv)*D]: q [T,Hq,D] and k [T,Hkv,D], each head
    RMS-normalised (when weights are given, as Qwen3) and rotated at its position, in place:
    q and k are views of qkv. cos/sin are the float32 tables [max_positions, rot_dim]."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if qkv.dim() != 2 or qkv.stride(1) != 1 or not _f32(qkv):
        raise ValueError("qkv must be a 2-D float32 CPU tensor, contiguous in its last dim")
    if qkv.shape[1] < q_size + kv_size:
        raise ValueError(f"qkv {tuple(qkv.shape)} is narrower than q + k")
    rot = cos.shape[1]
    if (
        rot > head_dim
        or rot % 2
        or not (_f32(cos) and _f32(sin))
        or cos.stride(1) != 1
        or sin.stride() != cos.stride()
        or sin.shape != cos.shape
    ):
        raise ValueError(f"bad rotary tables {tuple(cos.shape)} for head_dim {head_dim}")
    norm = q_weight is not None
    if norm:
        q_weight, k_weight = q_weight.float().contiguous(), k_weight.float().contiguous()
    t = qkv.shape[0]
    q = qkv[:, :q_size].view(t, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(t, num_kv_heads, head_dim)
    if t:
        positions = positions.to(torch.int64).contiguous()
        bad = _library.load().asyncllm_qk_norm_rope_f32(
            q.data_ptr(),
            qkv.stride(0),
            num_heads,
            k.data_ptr(),
            qkv.stride(0),
            num_kv_heads,
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            cos.stride(0),
            cos.shape[0],
            q_weight.data_ptr() if norm else None,
            k_weight.data_ptr() if norm else None,
            eps,
            head_dim,
            rot,
            t,
            torch.get_num_threads(),
        )
        if bad:
            raise IndexError(f"{bad} positions outside the rotary table [0, {cos.shape[0]})")
    return q, k


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> bool:
    """Store each new token's K/V [T, Hkv, D] at its flat slot of the paged cache
    [2, num_blocks, block_size, Hkv, D]; slots of -1 are skipped. False (nothing written) when
    the inputs are not float32 CPU tensors of this layout: the caller writes with torch."""
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    row = heads * dim
    if not (
        _f32(k)
        and _f32(v)
        and _f32(kv_cache)
        and kv_cache.is_contiguous()
        and k.shape == v.shape == (slot_mapping.shape[0], heads, dim)
        and k.stride()[1:] == (dim, 1)
        and v.stride()[1:] == (dim, 1)
    ):
        return False
    t = k.shape[0]
    if t:
        slots = slot_mapping.to(torch.int64).contiguous()
        bad = _library.load().asyncllm_write_kv_f32(
            kv_cache.data_ptr(),
            num_blocks * block_size,
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            row,
            slots.data_ptr(),
            t,
            torch.get_num_threads(),
        )
        if bad:
            raise IndexError(f"{bad} slots outside [-1, {num_blocks * block_size})")
    return True
