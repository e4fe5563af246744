"""Paged decode attention: one new query token per sequence over its whole cached context.

GQA-aware: a program owns one KV head of one sequence and all G query heads that share it, so each
K/V tile is read from memory once for the whole group (the G query rows, padded to 16 for the
tensor cores, form the M side of the products). Split along the context: a sequence's context is
cut into `num_splits` equal chunks handled by separate programs, whose partial results (output and
log-sum-exp per head) a second kernel merges. The grid depends only on the batch size, never on
the context lengths, so a CUDA graph captured for a batch size stays valid for every length.

Two plans for cutting the context (`balanced`):
- v1 (the first round's): every sequence is cut into `num_splits` equal chunks. The longest
  sequence's chunks set the step's critical path, the short ones' are nearly empty programs.
- v2 (default): one chunk length for the whole batch, worked out on the device from the
  batch's total context (each program sums seq_lens: B int32 loads from L2) so that about
  `target_programs` equal work items cover it, never shorter than a tile, never more than the
  grid's `num_splits` per sequence. Long sequences get more splits, short ones one, so the
  programs are of one size (SGLang's decode kernel makes the same choice in a separate kernel,
  get_num_kv_splits). A sequence left with a single chunk writes its output directly and the
  merge skips it; at batch >= target / KV heads the grid has one split and no merge runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.engine.kernels._common import check_cache, next_pow2, upcast_flag

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 528  # v1: about four per multiprocessor on an H100 (132)
_MAX_SPLITS = 16  # v1
# v2: work items per multiprocessor the balanced plan aims at. Up to five programs are resident
# per SM (sm90 build: 96 registers a thread, 39 KiB of shared memory for the pipelined K/V
# tiles), so eight per SM is under two waves of equal items; each item is still >= one 64-token
# tile, its partial (GP x DP float32) a few percent of the KV it read. attn_ab sweeps 4 and 16.
_PROGRAMS_PER_SM = 8
_MAX_SPLITS_V2 = 32
_SUM_BLOCK = 256  # v2's seq_lens rows summed in one load: the CUDA graphs' largest batch
_SM_COUNT: dict[int, int] = {}


def choose_num_splits(batch: int, num_kv_heads: int) -> int:
    """v1: enough splits that small batches still fill the GPU; none once the batch does."""
    programs = max(1, batch * num_kv_heads)
    return max(1, min(_MAX_SPLITS, -(-_TARGET_PROGRAMS // programs)))


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (132 on an H100/H200; the interpreter's CPU: 132)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def target_programs(device: torch.device) -> int:
    return _PROGRAMS_PER_SM * sm_count(device)


def choose_grid_splits(batch: int, num_kv_heads: int, target: int) -> int:
    """v2: the grid's splits per sequence, an upper bound (the balanced plan uses fewer for short
    sequences). One, with no merge, once the batch alone gives `target` programs; else enough that
    the longest sequence can be cut to the batch's common chunk length (twice the even share)."""
    programs = max(1, batch * num_kv_heads)
    if programs >= target:
        return 1
    return max(1, min(_MAX_SPLITS_V2, -(-2 * target // programs)))


@triton.jit
def _split_plan(
    seq_lens_ptr,
    b,
    num_seqs,
    num_splits,
    target,
    window,
    num_kv_heads,
    BLOCK_N: tl.constexpr,
    WINDOWED: tl.constexpr,
    SUM_BLOCK: tl.constexpr,  # >= num_seqs, a power of two
):
    """v2's cut of sequence b: (first position, chunk length, chunks used >= 1). Integer math on
    the same inputs, so the decode and merge kernels agree."""
    seq_len = tl.load(seq_lens_ptr + b)
    lo = seq_len * 0
    if WINDOWED:
        lo = tl.maximum(seq_len - window, 0)
    span = seq_len - lo
    # the batch's total context in one load: SUM_BLOCK is 256 (the CUDA graphs' largest batch)
    # or the batch rounded up to a power of two past it, so one compiled kernel serves every
    # graph. Not a loop: a loop before the main one stops Triton (3.9, sm90) pipelining the K/V
    # loads (no cp.async; 255 registers with spills instead of 96).
    idx = tl.arange(0, SUM_BLOCK)
    lens = tl.load(seq_lens_ptr + idx, mask=idx < num_seqs, other=0)
    if WINDOWED:
        lens = tl.minimum(lens, window)
    total = lens.to(tl.int64)  # int64: head-tokens pass 2**31 at long contexts
    total = tl.sum(total, 0) * num_kv_heads
    share = tl.cdiv(total, target).to(tl.int32)
    chunk = tl.maximum(share, tl.cdiv(span, num_splits))
    chunk = tl.maximum(tl.cdiv(chunk, BLOCK_N), 1) * BLOCK_N
    used = tl.maximum(tl.cdiv(span, chunk), 1)
    return lo, chunk, used


@triton.jit
def _soft_cap(x, cap):
    """cap * tanh(x / cap), tanh from exp (exact enough in float32; saturates without NaN)."""
    e = tl.exp(-2.0 * tl.abs(x) / cap)
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0, -t, t)


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cblk,
    stride_ctok,
    num_splits,
    window,  # > 0: only the last `window` positions are seen (a sliding-window layer)
    softcap,  # > 0: scores become softcap * tanh(score / softcap), in natural-log units
    num_seqs,  # v2: rows of seq_lens summed for the batch's chunk length
    target,  # v2: work items the chunk length aims at
    G: tl.constexpr,  # query heads per KV head
    GP: tl.constexpr,  # G padded to a tensor-core M (>= 16)
    D: tl.constexpr,
    DP: tl.constexpr,
    BS: tl.constexpr,  # KV block size (tokens)
    BLOCK_N: tl.constexpr,  # context tokens per tile
    DIRECT: tl.constexpr,  # one split: write the output, not partials
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not tf32
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BALANCED: tl.constexpr,  # v2's plan (module docstring); else v1's equal cut per sequence
    SUM_BLOCK: tl.constexpr,  # v2: seq_lens rows summed in one load (>= num_seqs)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    if BALANCED:
        # keys before a window are neither seen nor read (their blocks may be freed)
        lo, chunk, used = _split_plan(
            seq_lens_ptr,
            b,
            num_seqs,
            num_splits,
            target,
            window,
            tl.num_programs(1),
            BLOCK_N,
            WINDOWED,
            SUM_BLOCK,
        )
        # a one-split grid always gives used == 1 (chunk >= span)
        direct = used == 1
    else:
        lo = 0
        if WINDOWED:
            lo = tl.maximum(seq_len - window, 0)
        chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        used = num_splits
        direct = DIRECT
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GP)
    gmask = g < G
    d = tl.arange(0, DP)
    dmask = d < D
    heads = kvh * G + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    head_off = kvh * D
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        blk = tl.load(bt_row + n // BS, mask=nmask, other=0)
        off = blk.to(tl.int64) * stride_cblk + (n % BS) * stride_ctok + head_off
        if D == DP:
            # no mask along head_dim: a d-dependent mask, even an all-true one, leaves the loads
            # unvectorised, so Triton neither pipelines them (cp.async) nor keeps the kernel
            # under 255 registers (sm90 build, Triton 3.9: 255 with spills -> 120-odd, 3 stages)
            kv_mask = nmask[:, None]
        else:
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
        if SOFTCAP:
            s = _soft_cap(s * (scale_log2 / 1.4426950408889634), softcap) * 1.4426950408889634
        else:
            s = s * scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if direct:
        # the only chunk of this row (a padding row, seq_len 0, writes zeros); v2's unused splits
        # of a one-chunk row write nothing: the merge skips the row
        if split == 0:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=gmask[:, None] & dmask[None, :],
            )
    elif split < used:
        # partials: [B, Hq, num_splits, DP] and [B, Hq, num_splits]; an empty chunk leaves
        # lse = -inf and weighs nothing in the merge
        row = (b * (tl.num_programs(1) * G) + heads).to(tl.int64) * num_splits + split
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(part_out_ptr + row[:, None] * DP + d[None, :], o, mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gmask)
    else:
        # v2: a split past this row's chunks read nothing; it weighs nothing in the merge
        row = (b * (tl.num_programs(1) * G) + heads).to(tl.int64) * num_splits + split
        tl.store(part_lse_ptr + row, tl.full([GP], float("-inf"), tl.float32), mask=gmask)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    seq_lens_ptr,
    num_seqs,
    target,
    window,
    num_kv_heads,
    H: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    SP: tl.constexpr,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOWED: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if BALANCED:
        _, _, used = _split_plan(
            seq_lens_ptr,
            b,
            num_seqs,
            num_splits,
            target,
            window,
            num_kv_heads,
            BLOCK_N,
            WINDOWED,
            SUM_BLOCK,
        )
        if used == 1:
            return  # the decode kernel wrote this row's output directly
    s = tl.arange(0, SP)
    smask = s < num_splits
    d = tl.arange(0, DP)
    row0 = (b * H + h).to(tl.int64) * num_splits
    lse = tl.load(part_lse_ptr + row0 + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all chunks empty (a padding row): no inf - inf
    live = lse > float("-inf")
    w = tl.where(live, tl.exp2(lse - m), 0.0)
    # a split that read nothing may have left its partial unwritten (v2): never multiply it
    parts = tl.load(
        part_out_ptr + (row0 + s)[:, None] * DP + d[None, :], mask=live[:, None], other=0.0
    )
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d,
        o.to(out_ptr.dtype.element_ty),
        mask=d < D,
    )


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    balanced: bool = True,
    target: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """q [B,Hq,D] (one token per sequence, already in the cache) -> [B,Hq,D].

    block_tables int32 [B,W]; seq_lens int32 [B] (0 = padding row: output zeros). A sliding
    window sees the last `sliding_window` positions only; a soft cap caps the scores.
    `balanced`: v2's cut of the context (module docstring), False: v1's. `num_splits` /
    `target` / `num_warps` / `num_stages`: overrides for tests and kernel_bench's sweep."""
    bsz, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    check_cache(kv_cache, hkv, d)
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous per row")
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    group = hq // hkv
    if target is None:
        target = target_programs(q.device)
    if balanced:
        splits = num_splits or choose_grid_splits(bsz, hkv, target)
    else:
        splits = num_splits or choose_num_splits(bsz, hkv)
    dp = next_pow2(d)
    gp = max(16, next_pow2(group))
    if block_n is None:
        block_n = 64 if dp <= 128 else 32
    direct = splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(bsz, hq, splits, dp, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, hq, splits, dtype=torch.float32, device=q.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(bsz, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        splits,
        int(sliding_window or 0),
        float(logits_soft_cap or 0.0),
        bsz,
        target,
        G=group,
        GP=gp,
        D=d,
        DP=dp,
        BS=bs,
        BLOCK_N=block_n,
        DIRECT=direct,
        UPCAST=upcast_flag(q.dtype),
        IEEE=q.dtype == torch.float32,
        WINDOWED=bool(sliding_window),
        SOFTCAP=bool(logits_soft_cap),
        BALANCED=balanced,
        SUM_BLOCK=max(_SUM_BLOCK, next_pow2(bsz)),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        _merge_kernel[(bsz, hq)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            seq_lens,
            bsz,
            target,
            int(sliding_window or 0),
            hkv,
            H=hq,
            D=d,
            DP=dp,
            SP=next_pow2(splits),
            BALANCED=balanced,
            BLOCK_N=block_n,
            WINDOWED=bool(sliding_window),
            SUM_BLOCK=max(_SUM_BLOCK, next_pow2(bsz)),
            num_warps=1 if dp <= 64 else 2,
        )
    return out
