"""KV cache write: each new token's K and V go to its flat slot (block_id * block_size + offset).

One program per token; slot -1 (padding, e.g. in a CUDA graph's unused rows) writes nothing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels._common import check_cache, next_pow2


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    v_offset,  # elements from the K half to the V half of the cache
    HD: tl.constexpr,  # Hkv * D: a token's K (or V) row, contiguous in both layouts
    HD_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        cols = tl.arange(0, HD_P)
        mask = cols < HD
        dst = cache_ptr + slot.to(tl.int64) * HD + cols
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + cols, mask=mask)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + cols, mask=mask)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + v_offset, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v [T,Hkv,D] (each token's heads contiguous) into kv_cache [2,NB,BS,Hkv,D]."""
    t, h, d = k.shape
    if t == 0:
        return
    check_cache(kv_cache, h, d)
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    for name, x in (("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError(f"{name} must be contiguous per token ([T,Hkv,D] with D innermost)")
    if slot_mapping.shape[0] != t:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {t} tokens")
    _write_kv_kernel[(t,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        kv_cache.stride(0),
        HD=h * d,
        HD_P=next_pow2(h * d),
        num_warps=4,
    )
