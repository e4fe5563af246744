"""Triton fused mixture-of-experts: every token's top-k experts in two grouped GEMM launches.

The (token, slot) pairs are sorted by expert and each expert's run is padded to BLOCK_M rows
(`moe_align`), so one program block of BLOCK_M rows always belongs to one expert. Then:
  1. gate/up: h = silu(x W1_e^T) * (x W3_e^T) for each block's expert, the activation in the
     epilogue (both halves of w13 are read by the same program), h is [T*k, I];
  2. down: y = (h W2_e^T) * routing weight, the weight in the epilogue, y is [T*k, H];
  3. out[t] = sum over the k slots of y (one torch reduction: deterministic, no atomics).
Everything is sized from shapes known on the host (T, k, E, block size) and the padded length is
read by the kernels from device memory, so there is no host sync and the whole call can be
captured in a CUDA graph.

Block sizes come from `get_config(M, ...)`: a table for the H200 (decode- and prefill-sized M)
derived from the rows each expert sees, overridable by `ASYNCLLM_MOE_CONFIG` (a JSON file that
`asyncllm/bench/moe_tune.py` writes: {"<M>": {BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
num_stages}}; the nearest M is used).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from asyncllm import envs
from asyncllm.engine.kernels._common import upcast_flag


# ---- routing: softmax over the experts, top-k, renormalise ----------------------------------------
@triton.jit
def _topk_softmax_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    stride_l,
    num_experts,
    TOP_K: tl.constexpr,
    K_P2: tl.constexpr,
    E_P2: tl.constexpr,
    RENORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E_P2)
    ok = cols < num_experts
    x = tl.load(logits_ptr + row * stride_l + cols, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(ok, p, -1.0)
    slots = tl.arange(0, K_P2)
    w = tl.zeros([K_P2], dtype=tl.float32)
    ids = tl.zeros([K_P2], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        # highest first, the lowest index among equals
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, cols, E_P2), axis=0)
        w = tl.where(slots == j, best, w)
        ids = tl.where(slots == j, idx, ids)
        p = tl.where(cols == idx, -1.0, p)
    if RENORM:
        w = w / tl.sum(w, axis=0)  # the unused slots hold 0
    keep = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, w, mask=keep)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=keep)


def topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.moe.select_experts in one kernel: router_logits [T, E] -> (float32 weights,
    int32 ids), each [T, k], highest probability first."""
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise ValueError("router_logits must be 2-D and contiguous in its last dim")
    t, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in [1, {num_experts}]")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t:
        e_p2 = triton.next_power_of_2(num_experts)
        _topk_softmax_kernel[(t,)](
            router_logits,
            weights,
            ids,
            router_logits.stride(0),
            num_experts,
            TOP_K=top_k,
            K_P2=triton.next_power_of_2(top_k),
            E_P2=e_p2,
            RENORM=renormalize,
            num_warps=1 if e_p2 <= 256 else 4,
        )
    return weights, ids


# ---- sorting (token, slot) pairs by expert --------------------------------------------------------
def _align_sizes(n: int, block_m: int, num_experts: int) -> tuple[int, int]:
    # at most min(E, n) experts are hit, each padding by at most block_m - 1 rows
    max_padded = n + min(num_experts, n) * (block_m - 1)
    max_blocks = triton.cdiv(max_padded, block_m)
    return max_blocks * block_m, max_blocks


@triton.jit(do_not_specialize=["n"])
def _align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    n,
    E: tl.constexpr,
    E_P2: tl.constexpr,  # > E: bin E collects the masked lanes
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program per expert; each counts every expert (cheap at these sizes) to find where its
    # run starts, then writes its blocks' expert id, its pairs in order and its padding
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        v = tl.load(ids_ptr + idx, mask=idx < n, other=E)
        counts += tl.histogram(v, E_P2)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    my_end = tl.sum(tl.where(bins == e, pad_end, 0), axis=0)
    my_count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    my_start = my_end - tl.sum(tl.where(bins == e, padded, 0), axis=0)
    if e == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for b in range(my_start // BLOCK_M, my_end // BLOCK_M):
        tl.store(expert_ids_ptr + b, e)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + my_start + my_count + pad, n, mask=my_start + my_count + pad < my_end)
    run = 0
    for start in range(0, n, BLOCK):
        idx = start + offs
        v = tl.load(ids_ptr + idx, mask=idx < n, other=E)
        hit = (v == e).to(tl.int32)
        pos = my_start + run + tl.cumsum(hit, 0) - 1
        tl.store(sorted_ids_ptr + pos, idx, mask=hit > 0)
        run += tl.sum(hit, axis=0)


def moe_align(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids, expert_ids, num_padded).

    sorted_ids int32: flat pair indices (t*k + j) grouped by expert in ascending order, each
    expert's run padded to a multiple of block_m with the sentinel T*k; expert_ids int32: the
    expert of each block; num_padded [1] int32: the used length of sorted_ids. Entries at or
    past num_padded are unspecified: the kernels skip those blocks. One launch, no host sync."""
    n = topk_ids.numel()
    padded_len, max_blocks = _align_sizes(n, block_m, num_experts)
    dev = topk_ids.device
    sorted_ids = torch.empty(padded_len, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    _align_kernel[(num_experts,)](
        ids,
        sorted_ids,
        expert_ids,
        num_padded,
        n,
        E=num_experts,
        E_P2=triton.next_power_of_2(num_experts + 1),
        BLOCK_M=block_m,
        BLOCK=1024 if n > 256 else 256,  # two variants: few compiles across batch sizes
        num_warps=4,
    )
    return sorted_ids, expert_ids, num_padded


def moe_align_torch(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align in torch ops (~30 small kernels, no host sync): the check for the kernel."""
    n = topk_ids.numel()
    padded_len, max_blocks = _align_sizes(n, block_m, num_experts)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # not bincount: it syncs for the max
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    sorted_e, order = torch.sort(flat, stable=True)
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - cnt_start[sorted_e]
    sorted_ids = torch.full((padded_len,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(max_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(pad_end, starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), pad_end[-1:].to(torch.int32)


# ---- the two grouped GEMMs ------------------------------------------------------------------------
@triton.jit
def _block_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # grouped ordering: programs running together share weight tiles (L2) within an expert
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_pairs", "padded_len"])
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2I, H]: gate rows then up rows
    out_ptr,  # [T*k, I]
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,  # T*k: the sentinel
    padded_len,  # len(sorted_ids)
    inter,
    hidden,
    stride_xt,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(padded_len, BLOCK_M)
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    pid_m, pid_n = _block_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    # B tiles [BLOCK_K, BLOCK_N] read from row-major [2I, H]: K is the contiguous dim
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = out_ptr.dtype.element_ty
    # the rounding of the torch path: each projection, then silu, then the product
    gate = acc_g.to(dt).to(tl.float32)
    up = acc_u.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, (act * up).to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "padded_len"])
def _down_kernel(
    h_ptr,  # [T*k, I]
    w_ptr,  # [E, H, I]
    out_ptr,  # [T*k, H]
    topk_w_ptr,  # [T*k] float32
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    padded_len,
    hidden,
    inter,
    stride_hm,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(padded_len, BLOCK_M)
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    pid_m, pid_n = _block_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pairs < num_pairs
    rows = pairs.to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = offs_k < inter - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dt = out_ptr.dtype.element_ty
    weight = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = acc.to(dt).to(tl.float32) * weight[:, None]  # the expert's output, then its weight
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(dt), mask=row_ok[:, None] & n_ok[None, :])


# ---- block sizes ----------------------------------------------------------------------------------
def _default_config(m: int, num_experts: int, top_k: int) -> dict[str, int]:
    """H200 table by the rows an expert sees on average (M*k/E). Decode is weight-bandwidth bound:
    one block should cover an expert's rows (a second block re-reads its weights), and narrow N
    tiles give enough programs to keep every SM streaming when few experts are hit. Prefill is
    compute bound: large tiles, grouped ordering for L2 reuse."""
    rows = m * top_k / max(1, num_experts)
    if rows <= 8:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows <= 24:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows <= 96:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


CONFIG_DIR = Path(__file__).parent / "moe_configs"


def config_file_name(
    num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str
) -> str:
    """Where `asyncllm/bench/moe_tune.py` writes a tuned table for a layer shape on a GPU."""
    return f"E={num_experts},N={inter},H={hidden},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.lru_cache(maxsize=1)
def device_slug() -> str:
    """ "h200" for "NVIDIA H200" (the short name of the current CUDA device)."""
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
    m = re.search(r"\b([ahlbv]\d{2,3}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


@functools.lru_cache(maxsize=16)
def _tuned(path: str) -> dict[int, dict[str, int]]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(k): v for k, v in json.load(f).items()}


def get_config(
    m: int,
    num_experts: int,
    top_k: int,
    inter: int | None = None,
    hidden: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Block sizes for M tokens: ASYNCLLM_MOE_CONFIG's table if set, else a tuned table for this
    layer shape and GPU (moe_configs/), else the default table; a table's nearest M is used."""
    cfg = dict(_lookup(m, num_experts, top_k, inter, hidden, dtype, envs.moe_config()))
    return fit_shared_memory(cfg, dtype.itemsize if dtype is not None else 2)


# Hopper's per-block shared memory is 227 KiB; keep clear of it. The tables are written for 2-byte
# inputs: float32 models (tests, references) need half the bytes per stage.
SHARED_MEMORY_BUDGET = 200 * 1024


def gate_up_stage_bytes(cfg: dict[str, int], elem_bytes: int) -> int:
    """Shared memory one pipeline stage of the gate/up kernel holds: the activation tile and the
    gate and up weight tiles (the down kernel's stage, one weight tile, is smaller)."""
    return (cfg["BLOCK_M"] + 2 * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem_bytes


def fit_shared_memory(cfg: dict[str, int], elem_bytes: int) -> dict[str, int]:
    """Fewer stages (down to 2), then a shorter BLOCK_K (down to 16), until the stages fit."""
    cfg = dict(cfg)
    stages = cfg.get("num_stages", 2)
    while gate_up_stage_bytes(cfg, elem_bytes) * stages > SHARED_MEMORY_BUDGET:
        if stages > 2:
            stages -= 1
        elif cfg["BLOCK_K"] > 16:
            cfg["BLOCK_K"] //= 2
        else:
            break
    if "num_stages" in cfg:
        cfg["num_stages"] = stages
    return cfg


@functools.lru_cache(maxsize=256)
def _lookup(m, num_experts, top_k, inter, hidden, dtype, path) -> dict[str, int]:
    if not path and inter is not None and hidden is not None and dtype is not None:
        path = str(CONFIG_DIR / config_file_name(num_experts, inter, hidden, dtype, device_slug()))
    table = _tuned(path) if path else {}
    if table:
        return table[min(table, key=lambda k: abs(math.log2(max(k, 1)) - math.log2(max(m, 1))))]
    return _default_config(m, num_experts, top_k)


# ---- the launcher ---------------------------------------------------------------------------------
def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights [T, k]
    (any float dtype), topk_ids [T, k] (ints in [0, E)) -> [T, H] in x's dtype:
    sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j]."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe wants x [T,H], w13 [E,2I,H], w2 [E,H,I]")
    t, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, inter) or two_i % 2:
        raise ValueError(
            f"expert weights {tuple(w13.shape)} / {tuple(w2.shape)} do not fit hidden {hidden}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != t:
        raise ValueError("topk_ids and topk_weights must both be [T, k]")
    if x.dtype != w13.dtype or w2.dtype != w13.dtype:
        raise ValueError(f"x ({x.dtype}) and the expert weights must share a dtype")
    top_k = topk_ids.shape[1]
    out = torch.empty(t, hidden, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    x = x.contiguous()
    w13 = w13.contiguous()
    w2 = w2.contiguous()
    cfg = dict(config or get_config(t, num_experts, top_k, inter, hidden, x.dtype))
    block_m = cfg.pop("BLOCK_M")
    block_n, block_k, group_m = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    sorted_ids, expert_ids, num_padded = moe_align(topk_ids, block_m, num_experts)
    pairs = t * top_k
    padded_len = sorted_ids.numel()
    upcast = upcast_flag(x.dtype)
    # float32 models get float32 products (tl.dot would otherwise round the inputs to tf32)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    grid_m = triton.cdiv(padded_len, block_m)
    _gate_up_kernel[(grid_m * triton.cdiv(inter, block_n),)](
        x,
        w13,
        h,
        sorted_ids,
        expert_ids,
        num_padded,
        pairs,
        padded_len,
        inter,
        hidden,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        h.stride(0),
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        UPCAST=upcast,
        PRECISION=precision,
        **launch,
    )
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _down_kernel[(grid_m * triton.cdiv(hidden, block_n),)](
        h,
        w2,
        y,
        weights,
        sorted_ids,
        expert_ids,
        num_padded,
        pairs,
        padded_len,
        hidden,
        inter,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        UPCAST=upcast,
        PRECISION=precision,
        **launch,
    )
    if top_k == 1:
        return y.view(t, hidden)
    torch.sum(y.view(t, top_k, hidden), dim=1, out=out)
    return out
