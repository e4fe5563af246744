"""Triton weight-only quantized GEMMs below quant_gemm.DEQUANT_MIN_M rows (decode batches), written
to stream the weight once at the memory bandwidth. Same layouts as kernels/quant_gemm.py:
- int4: `qweight` int32 [K/8, N] (input 8r+j in bits 4j.. of word row r), fp16 scales and uint8
  zeros [K/group, N]: w = (q - z) * s.
- fp8 e4m3: W [N, K] as stored, float32 scales per (block_n x block_k) tile; per output channel
  is the block (1, K).

Why the tile kernel (quant_gemm._quant_gemm_kernel) is slow at M=1 (0.14 of its byte floor on the
H200): it loads the [BLOCK_K, BLOCK_N] words tile with one word per input (each word 8 times
from L1: 4 bytes of load traffic per 4-bit weight), runs a 16-row tl.dot for one real row, and
its grid (BLOCK_N 64, split-K up to 2x the SMs) leaves a program streaming a long K alone. Here:

- every program owns a slab: BLOCK_N outputs x one split of K; each word is loaded once, the
  loads are coalesced along the packed N (int4) or the contiguous K (fp8), and the grid has
  about four programs per SM;
- int4 GEMV (`_w4_gemv_kernel`, up to GEMV_MAX_M rows): no shift and int->float conversion
  per nibble but the exponent trick: nibble j masked in place and OR-ed into the mantissa of
  2^23, minus 2^23, is q * 2^(4j) exactly (one LOP3 + one FADD); the 2^-4j goes into the
  activation, which is tiny. Scale and zero are factored out of the 8 nibbles of a word:
  acc += s * sum_j(q_j x_j) - s * z * sum_j(x_j), so a weight costs one LOP3, one FADD and one
  FMA per row. The H200 can issue ~3.5-4 instructions per 4-bit weight at its bandwidth (132
  SMs x 128 lanes at 1.7-1.98 GHz against ~8.5e12 weights/s); ptxas (sm_90, Triton 3.9) puts
  the loop at ~4.7 per weight at one row, so it should run a little under the bandwidth;
- int4 with tl.dot (`_w4_dot_kernel`, above GEMV_MAX_M rows): the words tile loaded once and
  unpacked by broadcasting to [BLOCK_K, BLOCK_N], then the tensor cores;
- fp8 GEMV (`_w8_gemv_kernel`, W8A16: bf16 activations, no activation quantization kernel);
- K splits are summed by the last program of each output tile, in split order (deterministic):
  each writes its float32 partial, takes a ticket from a per-tile counter (acq_rel atomic); the
  one holding the last ticket adds the partials, writes the output and resets the counter. One
  kernel per linear, no memset and no separate reduction kernel (in a CUDA-graphed decode step of
  128 linears each extra kernel costs ~1-2 us).

The workspace (partials and counters) is one per device, reserved at load (`reserve`) so that a
CUDA graph capture never allocates it. References: kernels.reference.int4_gemm_ref,
fp8_block_gemm_ref.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

# Rows up to which the int4 GEMV runs (its FMA count grows with the rows; beyond it tl.dot).
# Set from the H200 run (results/quant-device-h200-2026-12-02.json): at 1 row the GEMV beats the
# tl.dot kernel on every Llama-3-8B linear (gate_up 36.7 vs 73.5 us), at 4 rows it loses on
# every one (86.7 vs 74.6 us), so only single rows take it.
GEMV_MAX_M = 1
# Rows up to which the fp8 W8A16 GEMV runs instead of W8A8 _scaled_mm (fp8.py). Same run: at 1 row
# the GEMV is 1.35-2.4x faster than W8A8 on all four linears, at 4 rows 2-3x slower.
FP8_GEMV_MAX_M = 1
# Float32 partials of the workspace (16 MiB) and per-tile counters.
WORKSPACE_FLOATS = 4 << 20
COUNTERS = 1 << 15
MAX_SPLIT = 32


@triton.jit
def _reduce_splits(
    acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, tile, pid_k,
    SPLIT,
):  # fmt: skip
    """Store acc [BLOCK_M, BLOCK_N] (one K split's sum) or, with SPLIT > 1, its partial; the
    last program of the tile sums the SPLIT partials in order and stores the output."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        rows = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + rows, acc, mask=ok)
        # Every thread's partial is issued before the (one-thread) release of the ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT):
                # .cg: from L2, past this SM's L1 (the partials were written by other SMs)
                total += tl.load(
                    ws_ptr + s * M * N + rows, mask=ok, other=0.0, cache_modifier=".cg"
                )
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _reduce_row(
    acc, y_ptr, ws_ptr, cnt_ptr, m, offs_n, M, N, stride_ym, stride_yn, counter, pid_k,
    SPLIT,
):  # fmt: skip
    """_reduce_splits for one row m (acc [BLOCK_N]), with its own counter."""
    ok = (offs_n < N) & (offs_n * 0 + m < M)
    y = y_ptr + m * stride_ym + offs_n * stride_yn
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        row = m * N + offs_n
        tl.store(ws_ptr + pid_k * M * N + row, acc, mask=ok)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + counter, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT):
                total += tl.load(ws_ptr + s * M * N + row, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt_ptr + counter, 0)


@triton.jit
def _x_row(x_ptr, m, M, k, stride_xm, stride_xk):
    """Inputs k of row m in float32 (zeros past the last row)."""
    ok = (k >= 0) & (k * 0 + m < M)
    return tl.load(x_ptr + m * stride_xm + k * stride_xk, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW_PER_SPLIT, NIBBLE,
    stride_xm, stride_xk, stride_wa, stride_wb, stride_sa, stride_sb, stride_za, stride_zb,
    stride_ym, stride_yn,
    SPLIT, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M (1, 2 or 4) rows x BLOCK_N outputs x KW_PER_SPLIT word rows (8
    inputs each). A step of BLOCK_KW word rows lies in one group (8 * BLOCK_KW divides
    GROUP_K) and KW_PER_SPLIT is a multiple of BLOCK_KW: no K masks. Every tensor is 2-D
    [BLOCK_KW, BLOCK_N] (or its row slice), one accumulator per row: Triton then gives each
    thread 16 consecutive words of one word row (four 16-byte loads) and the activations in
    the matching slice layout, with no layout conversion (no shared memory) in the loop.
    NIBBLE is 15, passed at run time so that the eight masks stay in registers."""
    pid_m = tl.program_id(0)  # fastest: the row blocks of one weight slab run together (L2)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_KW)
    n_ok = offs_n < N
    acc0 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    r_begin = pid_k * KW_PER_SPLIT
    for r0 in range(r_begin, r_begin + KW_PER_SPLIT, BLOCK_KW):
        r = r0 + rows
        words = tl.load(
            w_ptr + r[:, None] * stride_wa + offs_n[None, :] * stride_wb,
            mask=n_ok[None, :],
            other=0,
        ).to(tl.uint32, bitcast=True)
        g = (r0 * 8) // GROUP_K
        # scale and zero broadcast over the step's word rows, loaded in the words' layout (as
        # [BLOCK_N] vectors they would be converted through shared memory every step)
        s = tl.load(
            s_ptr + g * stride_sa + offs_n[None, :] * stride_sb + 0 * r[:, None],
            mask=n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        z = tl.load(
            z_ptr + g * stride_za + offs_n[None, :] * stride_zb + 0 * r[:, None],
            mask=n_ok[None, :],
            other=0,
        ).to(tl.float32)
        zs = z * s
        high = words >> 20  # nibbles 5..7 at bits 0, 4, 8: all under the mantissa's 23 bits
        t0 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        t1 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        t2 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        t3 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        xs0 = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        xs1 = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        xs2 = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        xs3 = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        for j in tl.static_range(8):
            if j < 5:
                bits = (words & (NIBBLE << (4 * j))) | 0x4B000000
                f = 1.0 / (1 << (4 * j))
            else:
                bits = (high & (NIBBLE << (4 * (j - 5)))) | 0x4B000000
                f = 1.0 / (1 << (4 * (j - 5)))
            q = bits.to(tl.float32, bitcast=True) - 8388608.0  # q * 2^(4j) (or 2^(4j-20)), exactly
            k = r * 8 + j
            x = _x_row(x_ptr, m0, M, k, stride_xm, stride_xk)
            xs0 += x
            t0 += q * (x * f)[:, None]
            if BLOCK_M > 1:
                x = _x_row(x_ptr, m0 + 1, M, k, stride_xm, stride_xk)
                xs1 += x
                t1 += q * (x * f)[:, None]
            if BLOCK_M > 2:
                x = _x_row(x_ptr, m0 + 2, M, k, stride_xm, stride_xk)
                xs2 += x
                t2 += q * (x * f)[:, None]
                x = _x_row(x_ptr, m0 + 3, M, k, stride_xm, stride_xk)
                xs3 += x
                t3 += q * (x * f)[:, None]
        # written as two fused multiply-adds per word
        acc0 = acc0 + t0 * s - zs * xs0[:, None]
        if BLOCK_M > 1:
            acc1 = acc1 + t1 * s - zs * xs1[:, None]
        if BLOCK_M > 2:
            acc2 = acc2 + t2 * s - zs * xs2[:, None]
            acc3 = acc3 + t3 * s - zs * xs3[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    _reduce_row(tl.sum(acc0, axis=0), y_ptr, ws_ptr, cnt_ptr, m0, offs_n, M, N, stride_ym,
                stride_yn, tile * BLOCK_M, pid_k, SPLIT)  # fmt: skip
    if BLOCK_M > 1:
        _reduce_row(tl.sum(acc1, axis=0), y_ptr, ws_ptr, cnt_ptr, m0 + 1, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 1, pid_k, SPLIT)  # fmt: skip
    if BLOCK_M > 2:
        _reduce_row(tl.sum(acc2, axis=0), y_ptr, ws_ptr, cnt_ptr, m0 + 2, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 2, pid_k, SPLIT)  # fmt: skip
        _reduce_row(tl.sum(acc3, axis=0), y_ptr, ws_ptr, cnt_ptr, m0 + 3, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 3, pid_k, SPLIT)  # fmt: skip


@triton.jit
def _w4_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW_PER_SPLIT,
    stride_xm, stride_xk, stride_wa, stride_wb, stride_sa, stride_sb, stride_za, stride_zb,
    stride_ym, stride_yn,
    SPLIT, GROUP_K: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    """The words tile [BLOCK_KW, BLOCK_N] loaded once, unpacked by broadcasting to
    [BLOCK_KW, 8, BLOCK_N] and reshaped to the [8 * BLOCK_KW, BLOCK_N] operand of tl.dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_KW)
    shifts = tl.arange(0, 8) * 4
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_begin = pid_k * KW_PER_SPLIT
    for r0 in range(r_begin, r_begin + KW_PER_SPLIT, BLOCK_KW):
        r = r0 + rows
        words = tl.load(
            w_ptr + r[:, None] * stride_wa + offs_n[None, :] * stride_wb,
            mask=n_ok[None, :],
            other=0,
        )
        g = (r0 * 8) // GROUP_K
        s = tl.load(s_ptr + g * stride_sa + offs_n * stride_sb, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + g * stride_za + offs_n * stride_zb, mask=n_ok, other=0)
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q, (8 * BLOCK_KW, BLOCK_N))
        w = (q.to(tl.float32) - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        kk = r0 * 8 + tl.arange(0, 8 * BLOCK_KW)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None],
            other=0.0,
        )
        if FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tile = pid_n * tl.num_programs(0) + pid_m
    _reduce_splits(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn,
                   tile, pid_k, SPLIT)  # fmt: skip


@triton.jit
def _w8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, GROUP_N, GROUP_K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sa, stride_sb, stride_ym, stride_yn,
    SPLIT, PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp8 W [N, K] (K contiguous) x BLOCK_M (1, 2 or 4) rows: products accumulate per
    (n, k) lane in float32, one [BLOCK_N, BLOCK_K] accumulator per row, summed over K once at
    the end. PER_CHANNEL: one scale per output, applied to the sum; else the
    (n // GROUP_N, k // GROUP_K) block's scale per step (BLOCK_K divides GROUP_K)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk,
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if not PER_CHANNEL:
            s = tl.load(
                s_ptr + (offs_n // GROUP_N)[:, None] * stride_sa + (k0 // GROUP_K) * stride_sb
                + 0 * kk[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )  # fmt: skip
            w = w * s
        acc0 += w * _x_row(x_ptr, m0, M, tl.where(k_ok, kk, -1), stride_xm, stride_xk)[None, :]
        if BLOCK_M > 1:
            acc1 += w * _x_row(x_ptr, m0 + 1, M, tl.where(k_ok, kk, -1), stride_xm,
                               stride_xk)[None, :]  # fmt: skip
        if BLOCK_M > 2:
            acc2 += w * _x_row(x_ptr, m0 + 2, M, tl.where(k_ok, kk, -1), stride_xm,
                               stride_xk)[None, :]  # fmt: skip
            acc3 += w * _x_row(x_ptr, m0 + 3, M, tl.where(k_ok, kk, -1), stride_xm,
                               stride_xk)[None, :]  # fmt: skip
    if PER_CHANNEL:
        sc = tl.load(s_ptr + offs_n * stride_sa, mask=n_ok, other=0.0)
    else:
        sc = tl.full((BLOCK_N,), 1.0, tl.float32)
    tile = pid_n * tl.num_programs(0) + pid_m
    _reduce_row(tl.sum(acc0, axis=1) * sc, y_ptr, ws_ptr, cnt_ptr, m0, offs_n, M, N, stride_ym,
                stride_yn, tile * BLOCK_M, pid_k, SPLIT)  # fmt: skip
    if BLOCK_M > 1:
        _reduce_row(tl.sum(acc1, axis=1) * sc, y_ptr, ws_ptr, cnt_ptr, m0 + 1, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 1, pid_k, SPLIT)  # fmt: skip
    if BLOCK_M > 2:
        _reduce_row(tl.sum(acc2, axis=1) * sc, y_ptr, ws_ptr, cnt_ptr, m0 + 2, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 2, pid_k, SPLIT)  # fmt: skip
        _reduce_row(tl.sum(acc3, axis=1) * sc, y_ptr, ws_ptr, cnt_ptr, m0 + 3, offs_n, M, N,
                    stride_ym, stride_yn, tile * BLOCK_M + 3, pid_k, SPLIT)  # fmt: skip


# ---- the workspace --------------------------------------------------------------------------
@dataclass
class _Workspace:
    partials: torch.Tensor  # float32 [WORKSPACE_FLOATS]
    counters: torch.Tensor  # int32 [COUNTERS], zero between calls (each tile's last resets it)


_WORKSPACES: dict[torch.device, _Workspace] = {}


def reserve(device: torch.device) -> None:
    """Allocate the device's workspace now (at load, before any CUDA graph is captured)."""
    workspace(torch.device(device))


def workspace(device: torch.device) -> _Workspace:
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _Workspace(
            torch.empty(WORKSPACE_FLOATS, device=device, dtype=torch.float32),
            torch.zeros(COUNTERS, device=device, dtype=torch.int32),
        )
        _WORKSPACES[device] = ws
    return ws


@lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_target(device: torch.device) -> int:
    """About four resident programs per SM keep ~30 KB of loads in flight per SM (the H200
    needs ~20: 4.2 TB/s x ~0.6 us over 132 SMs). The interpreter: any small number."""
    if device.type != "cuda":
        return 8
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_split(
    counters: int, k_steps: int, m: int, n: int, target: int, tiles: int
) -> tuple[int, int]:
    """(split, steps per split): about `target` programs over `tiles` output tiles, every split
    the same whole number of K steps (no K masks), the partials inside the workspace and a
    counter for each of the `counters` (tile, row) pairs."""
    want = max(1, min(-(-target // max(tiles, 1)), k_steps, MAX_SPLIT))
    while want > 1 and want * m * n > WORKSPACE_FLOATS:
        want -= 1
    # the largest split <= want that divides the K steps evenly
    split = max(d for d in range(1, want + 1) if k_steps % d == 0)
    if counters > COUNTERS:
        split = 1
    return split, k_steps // split


@dataclass(frozen=True)
class Plan:
    kernel: str  # "gemv" or "dot"
    block_m: int
    block_n: int
    block_kw: int  # int4: word rows per K step; fp8: BLOCK_K
    split: int
    steps: int  # K steps per split
    warps: int


def int4_plan(m: int, n: int, k: int, group_k: int, device: torch.device) -> Plan:
    """Tiles of the int4 path for m rows (m < quant_gemm.DEQUANT_MIN_M)."""
    # groups under 16 inputs have no tl.dot K tile: the GEMV keeps up to its 4-row tile there
    if m <= GEMV_MAX_M or (m <= 4 and group_k < 16):
        # [8, 256] words per step (8 KB): 16 consecutive words of one word row per thread
        kernel, bm, bn, warps = "gemv", min(4, triton.next_power_of_2(m)), 256, 4
    else:
        kernel = "dot"
        # from 128 rows, 128-row tiles: each weight tile is dequantized for twice the rows
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m < 128 else 128
        bn, warps = (64, 4) if m <= 64 else (128, 8)
    # up to 8 word rows (64 inputs) per step, inside one group
    if group_k % 8:
        raise ValueError(f"int4: group size {group_k} is not a multiple of 8")
    bkw = 8
    while (group_k // 8) % bkw:
        bkw //= 2
    if kernel == "dot" and 8 * bkw < 16:
        raise ValueError(f"group size {group_k} has no K tile of at least 16 inputs")
    tiles = -(-n // bn) * -(-m // bm)
    split, steps = choose_split(tiles * bm, k // (8 * bkw), m, n, programs_target(device), tiles)
    return Plan(kernel, bm, bn, bkw, split, steps, warps)


def int4_gemm_small(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, fp32: bool, plan: Plan | None = None,
) -> torch.Tensor:  # fmt: skip
    """x2 [M, K] @ dequant(qweight): the GEMV (M <= GEMV_MAX_M) or the tl.dot kernel
    (`plan`: forced tiles, for the benchmark's A/B)."""
    m, k = x2.shape
    n = qweight.shape[1]
    p = plan or int4_plan(m, n, k, group_size, x2.device)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    ws = workspace(x2.device)
    grid = (triton.cdiv(m, p.block_m), triton.cdiv(n, p.block_n), p.split)
    strides = (
        x2.stride(0), x2.stride(1), *qweight.stride(), *scales.stride(), *zeros.stride(),
        y.stride(0), y.stride(1),
    )  # fmt: skip
    if p.kernel == "gemv":
        _w4_gemv_kernel[grid](
            x2, qweight, scales, zeros, y, ws.partials, ws.counters,
            m, n, p.steps * p.block_kw, 15, *strides,
            GROUP_K=group_size, SPLIT=p.split, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_KW=p.block_kw,
            num_warps=p.warps,
        )  # fmt: skip
    else:
        _w4_dot_kernel[grid](
            x2, qweight, scales, zeros, y, ws.partials, ws.counters,
            m, n, p.steps * p.block_kw, *strides,
            GROUP_K=group_size, SPLIT=p.split, FP32=fp32, BLOCK_M=p.block_m, BLOCK_N=p.block_n,
            BLOCK_KW=p.block_kw, num_warps=p.warps,
        )  # fmt: skip
    return y


def fp8_plan(m: int, n: int, k: int, group_k: int, device: torch.device) -> Plan:
    """Tiles of the fp8 GEMV: 64 float32 accumulator lanes per thread over the block's rows."""
    bm = min(4, triton.next_power_of_2(m))
    bn, bk, warps = {1: (32, 256, 4), 2: (16, 256, 4), 4: (16, 128, 4)}[bm]
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    if group_k < k:  # block scales: a K step inside one block
        while group_k % bk and bk > 16:
            bk //= 2
        if group_k % bk:
            raise ValueError(f"fp8 block size {group_k} has no K step of at least 16 inputs")
    tiles = -(-n // bn) * -(-m // bm)
    split, steps = choose_split(tiles * bm, -(-k // bk), m, n, programs_target(device), tiles)
    return Plan("gemv", bm, bn, bk, split, steps, warps)


def fp8_gemv(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    """x2 [M, K] @ (fp8 weight [N, K] scaled)^T in x2's dtype. `block` None: per-channel scale
    (any tensor of N elements, e.g. _scaled_mm's [1, N]); else (bn, bk) block scales
    [ceil(N/bn), ceil(K/bk)]."""
    m, k = x2.shape
    n = weight.shape[0]
    per_channel = block is None or (block[0] == 1 and block[1] >= k)
    group_n, group_k = (1, k) if per_channel else block
    p = fp8_plan(m, n, k, group_k, x2.device)
    if per_channel:
        s = scale.reshape(-1)
        s_strides = (s.stride(0), 0)
    else:
        s = scale
        s_strides = s.stride()
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    ws = workspace(x2.device)
    grid = (triton.cdiv(m, p.block_m), triton.cdiv(n, p.block_n), p.split)
    _w8_gemv_kernel[grid](
        x2, weight, s, y, ws.partials, ws.counters,
        m, n, k, group_n, group_k, p.steps * p.block_kw,
        x2.stride(0), x2.stride(1), *weight.stride(), *s_strides, y.stride(0), y.stride(1),
        SPLIT=p.split, PER_CHANNEL=per_channel,
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_kw, num_warps=p.warps,
    )  # fmt: skip
    return y
