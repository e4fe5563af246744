"""Varlen paged prefill attention: the new tokens of each sequence attend causally to its whole
context, read through the block table (the cached prefix and this step's own tokens, which the
backend wrote to the cache first).

Work is a flat list of (sequence, first query row) tiles built on the host from the step's query
lengths, so a batch that mixes one long prompt chunk with many one-token decodes launches exactly
the tiles it needs instead of a padded grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels._common import check_cache, next_pow2, upcast_flag
from asyncllm.engine.kernels.decode_attention import _soft_cap

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    qsl_ptr,
    seq_lens_ptr,
    work_ptr,  # int32 [num_tiles, 2]: (sequence, first query row within the sequence)
    out_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cblk,
    stride_ctok,
    window,  # > 0: query position i sees keys i-window+1..i
    softcap,  # > 0: scores become softcap * tanh(score / softcap)
    G: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(work_ptr + tile * 2)
    m0 = tl.load(work_ptr + tile * 2 + 1)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # tokens before this step's first new token

    m = m0 + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    qpos = ctx + m
    d = tl.arange(0, DP)
    dmask = d < D
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    head_off = (h // G) * D
    # causal: the last query row of this tile sees keys up to its own position
    end = tl.minimum(seq_len, ctx + tl.minimum(m0 + BLOCK_M, q_len))
    lo = 0
    if WINDOWED:
        # the tile's first query row sees nothing before its window: skip those keys
        lo = tl.maximum(ctx + m0 - window + 1, 0)
    for n0 in range(lo, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        blk = tl.load(bt_row + n // BS, mask=nmask, other=0)
        off = blk.to(tl.int64) * stride_cblk + (n % BS) * stride_ctok + head_off
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = nmask[None, :] & (n[None, :] <= qpos[:, None])
        if WINDOWED:
            visible = visible & (n[None, :] > qpos[:, None] - window)
        if SOFTCAP:
            s = _soft_cap(s * (scale_log2 / 1.4426950408889634), softcap) * 1.4426950408889634
        else:
            s = s * scale_log2
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet keep m = -inf; shift them by 0 to avoid inf - inf
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


def build_prefill_work(query_start_loc: list[int], block_m: int) -> list[int]:
    """Flat (sequence, first row) pairs covering every new token once."""
    work: list[int] = []
    for b in range(len(query_start_loc) - 1):
        q_len = query_start_loc[b + 1] - query_start_loc[b]
        for m0 in range(0, q_len, block_m):
            work += (b, m0)
    return work


def prefill_block_m(max_query_len: int) -> int:
    # Decode-heavy mixed batches waste little on 16-row tiles; long chunks want 64.
    return 64 if max_query_len >= 64 else 16


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    work: torch.Tensor,
    block_m: int,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """q [T,Hq,D] -> [T,Hq,D]. `work` is int32 [num_tiles, 2] from build_prefill_work(block_m),
    on q's device. Sliding window and soft cap as in paged_decode_attention."""
    t, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    check_cache(kv_cache, hkv, d)
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous per row")
    if out is None:
        out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    num_tiles = work.shape[0]
    if t == 0 or num_tiles == 0:
        return out
    dp = next_pow2(d)
    if block_n is None:
        block_n = 64 if dp <= 128 else 32
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _prefill_kernel[(num_tiles, hq)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        work,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        int(sliding_window or 0),
        float(logits_soft_cap or 0.0),
        G=hq // hkv,
        D=d,
        DP=dp,
        BS=bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=upcast_flag(q.dtype),
        IEEE=q.dtype == torch.float32,
        WINDOWED=bool(sliding_window),
        SOFTCAP=bool(logits_soft_cap),
        num_warps=4,
        num_stages=2,
    )
    return out
