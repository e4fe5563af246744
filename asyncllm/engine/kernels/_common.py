"""What every kernel launcher shares: interpreter detection and small size helpers."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test mode). Its numpy back end computes bfloat16
    arithmetic wrongly (seen with triton 3.6 and 3.9), so kernels upcast loads to float32 there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_flag(dtype: torch.dtype) -> bool:
    return interpreting() and dtype != torch.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def check_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2,num_blocks,block_size,Hkv,D], got {kv_cache.shape}")
    if kv_cache.shape[3] != num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"kv_cache heads/head_dim {tuple(kv_cache.shape[3:])} do not match "
            f"k/v ({num_kv_heads}, {head_dim})"
        )
    if kv_cache.stride(4) != 1 or kv_cache.stride(3) != head_dim:
        raise ValueError("kv_cache must be contiguous in its last two dimensions")
