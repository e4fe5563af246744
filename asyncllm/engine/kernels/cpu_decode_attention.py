"""Paged decode attention on the CPU (float32), reading the paged KV cache in place.

The torch backend's decode path gathers every sequence's KV blocks into a padded copy (one
`index_select` per layer per step) and runs a masked SDPA over it; on the CPU benchmark that was
~24% of the time. This kernel (`cpu_decode_attention.c`, next to this file) reads each sequence's
blocks where they are, once, for all query heads of a KV head (GQA), OpenMP-parallel over
sequences (all KV heads of a block in one contiguous read), or over (sequence, KV head) when there
are fewer than two sequences per thread.

It is compiled at first use with the system C compiler and loaded with ctypes; the build, its
cache and the link against torch's OpenMP runtime are shared with the other CPU kernels
(asyncllm.engine.kernels._cpu_build).

No compiler or a failed build: `decode()` returns None and the caller uses the torch path (logged
once). `ASYNCLLM_CPU_ATTENTION=torch` keeps the torch backend from calling it at all.
"""

from __future__ import annotations

import ctypes
import logging
import shutil  # noqa: F401 - tests reach the build's tools through this module
import subprocess  # noqa: F401
from pathlib import Path

import torch
from torch import Tensor

from asyncllm import envs
from asyncllm.engine.kernels import _cpu_build
from asyncllm.engine.kernels._cpu_build import cache_dir, compiler, openmp_runtime

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
SYMBOL = "asyncllm_paged_decode_attention_f32"
__all__ = ["cache_dir", "compiler", "decode", "enabled", "load", "openmp_runtime", "usable"]


def _declare(lib: ctypes.CDLL) -> None:
    fn = getattr(lib, SYMBOL)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p, p, i64, i64, p, p, i64, i32, p, i32, i32, i32, i32, i32, i64]
    fn.argtypes += [ctypes.c_float, i32, i64, ctypes.c_float]
    fn.restype = ctypes.c_int


_library = _cpu_build.CLibrary(SOURCE, "CPU paged decode attention", _declare, logger)


def enabled() -> bool:
    """False when `ASYNCLLM_CPU_ATTENTION=torch` forces the torch path (the torch backend reads
    it once, when it is built; asyncllm.engine.kernel_paths)."""
    return envs.cpu_attention() != "torch"


def _build(cc: str, out_dir: Path) -> Path:
    """The cached library, built if missing. Raises on any failure."""
    return _library.build(cc, out_dir)


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; None (logged once) if that fails."""
    return _library.load()


def reset() -> None:
    """Forget the loaded library (tests: rebuild under another compiler or cache dir)."""
    _library.reset()


def applies(q: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel computes this case: float32 queries and cache on the CPU."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and kv_cache.device.type == "cpu"
    )


def usable(q: Tensor, kv_cache: Tensor) -> bool:
    """`applies` and not switched off by the environment."""
    return applies(q, kv_cache) and enabled()


def decode(
    q: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor | None:
    """q [B,Hq,D] (one new token per sequence) against each sequence's first seq_lens[b] cached
    tokens -> [B,Hq,D]; None when the kernel is not available (use the torch path). Rows with
    seq_len 0 (padding) come out as zeros. `window` > 0: only the last `window` positions are
    seen (and read); `softcap` > 0: scores are soft-capped (Gemma 2)."""
    lib = load()
    if lib is None:
        return None
    batch, hq, d = q.shape
    _, num_blocks, block_size, hkv, dk = kv_cache.shape
    if dk != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError("block_tables and seq_lens need one row per query")
    out = torch.empty(batch, hq, d, dtype=torch.float32)
    if batch == 0:
        return out
    bad = lib.asyncllm_paged_decode_attention_f32(
        out.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        kv_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        block_tables.shape[1],
        seq_lens.data_ptr(),
        batch,
        hq,
        hkv,
        d,
        block_size,
        num_blocks,
        scale,
        torch.get_num_threads(),
        int(window or 0),
        float(softcap or 0.0),
    )
    if bad:
        raise RuntimeError(
            f"CPU decode attention: {bad} work items (sequences or (sequence, kv head) pairs) "
            f"had a block id outside "
            f"[0, {num_blocks}) (or a scratch allocation failed)"
        )
    return out
