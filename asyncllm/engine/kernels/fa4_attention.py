"""FlashAttention-4 (PyPI `flash-attn-4`, `flash_attn.cute`) as a paged attention path on Hopper.

Imported lazily: `available()` is False wherever flash_attn.cute does not import (the CPU, CI,
an install without it) or the GPU is not sm90/sm100, and nothing else here runs then.

Layout: FA4's paged API takes K and V as two tensors (num_pages, page_size, Hkv, D) with an int32
page table (B, max_pages) and seqused_k (B,). Our per-layer cache [2, num_blocks, block_size, Hkv,
D] gives exactly that as kv_cache[0] and kv_cache[1] (contiguous views, no copy), our block tables
are the page table and seq_lens is seqused_k. A block size other than FA4's tile (128 for head_dim
128) takes its cp.async path instead of TMA (nano-vllm's 256 does too). The cache must hold finite
values in unused rows (FA4 loads whole tiles): ours is allocated with torch.zeros.
Causal masking in FA is aligned bottom-right, so the new tokens of a sequence are its last
query_len positions, as our contract says.

What FA4 does not do here: on sm90 this version has no split-KV (`SplitKV not supported on SM
9.0`), so decode runs B x Hkv programs (8 at batch 1 on Qwen3-0.6B) with the query rows padded to
a 128-row tile; sliding windows and soft caps are left to the Triton kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _interface() -> Any:
    try:
        from flash_attn.cute import interface
    except Exception:  # ImportError, or the CuTe DSL failing to load its libraries
        return None
    return interface


def available(device: torch.device | str | None = None) -> bool:
    """flash_attn.cute imports and the device is a Hopper or Blackwell GPU."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(dev)
    if major not in (9, 10):
        return False
    return _interface() is not None


def supports(head_dim: int, sliding_window: int | None, logits_soft_cap: float | None) -> bool:
    return head_dim % 8 == 0 and head_dim <= 256 and not sliding_window and not logits_soft_cap


def _out(r: Any) -> torch.Tensor:
    return r[0] if isinstance(r, tuple) else r


def decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B,Hq,D] (one new token per sequence, already in the cache) -> [B,Hq,D]."""
    fa = _interface()
    b, hq, d = q.shape
    out = fa.flash_attn_varlen_func(
        q.unsqueeze(1),  # (B, 1, Hq, D): one query row per sequence (a view, any strides)
        kv_cache[0],
        kv_cache[1],
        seqused_k=seq_lens,
        page_table=block_tables,
        softmax_scale=scale,
        causal=True,
    )
    return _out(out).view(b, hq, d)


def prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """q [T,Hq,D] (the new tokens of B sequences, already in the cache) -> [T,Hq,D]."""
    fa = _interface()
    out = fa.flash_attn_varlen_func(
        q,
        kv_cache[0],
        kv_cache[1],
        cu_seqlens_q=query_start_loc,
        max_seqlen_q=max_query_len,
        seqused_k=seq_lens,
        page_table=block_tables,
        softmax_scale=scale,
        causal=True,
    )
    return _out(out)
