"""Kernel timings on the GPU: achieved bandwidth of paged decode attention (the term that
dominates the throughput roofline), prefill attention TFLOP/s, cache-write bandwidth.

python -m asyncllm.bench.kernel_bench [--json PATH]
Each timing cycles through 28 layers' caches (as a model does) so repeated calls are not served
from L2; the median of triton.testing.do_bench is reported per layer."""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import torch

from asyncllm.bench.results import H100_BF16_FLOPS, H100_COPY_BW

HQ, HKV, D, LAYERS = 16, 8, 128, 28


def _paged(seq_lens: list[int], bs: int, layers: int, dtype=torch.bfloat16):
    blocks = [-(-n // bs) for n in seq_lens]
    nb = sum(blocks) + 1
    perm = torch.randperm(nb).tolist()
    width = max(blocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[used : used + n])
        used += n
    caches = [torch.randn(2, nb, bs, HKV, D, device="cuda", dtype=dtype) for _ in range(layers)]
    return caches, tables.cuda(), torch.tensor(seq_lens, dtype=torch.int32, device="cuda")


def bench_decode(batch: int, lo: int, hi: int, bs: int = 16, seed: int = 0, **kw) -> dict[str, Any]:
    from triton.testing import do_bench

    from asyncllm.engine.kernels.decode_attention import (
        choose_grid_splits,
        choose_num_splits,
        paged_decode_attention,
        target_programs,
    )

    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(batch)]
    layers = max(2, min(LAYERS, int(6e9 // (sum(lens) * HKV * D * 4 * 2 + 1))))
    caches, tables, seq_lens = _paged(lens, bs, layers)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def run():
        for c in caches:
            paged_decode_attention(q, c, tables, seq_lens, D**-0.5, out=out, **kw)

    # Inside a CUDA graph, as decode runs in the engine: eager Triton launches cost ~20 us of
    # Python each, which would swamp the small batches.
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = do_bench(graph.replay, warmup=50, rep=300, return_mode="median") / layers
    nbytes = sum(lens) * HKV * D * 2 * 2
    return {
        "kernel": "decode",
        "batch": batch,
        "ctx": f"U[{lo},{hi}]",
        "block_size": bs,
        # the grid's splits (v2: an upper bound per sequence; v1: every sequence's)
        "splits": kw.get("num_splits")
        or (
            choose_grid_splits(batch, HKV, target_programs(q.device))
            if kw.get("balanced", True)
            else choose_num_splits(batch, HKV)
        ),
        "us_per_layer": ms * 1e3,
        "GB_per_s": nbytes / ms / 1e6,
        "of_copy_bw": nbytes / ms / 1e-3 / H100_COPY_BW,
    }


def bench_prefill(n_seqs: int, q_len: int, prefix: int, bs: int = 16) -> dict[str, Any]:
    from triton.testing import do_bench

    from asyncllm.engine.kernels.prefill_attention import (
        build_prefill_work,
        paged_prefill_attention,
        prefill_block_m,
    )

    lens = [prefix + q_len] * n_seqs
    caches, tables, seq_lens = _paged(lens, bs, 2)
    t = n_seqs * q_len
    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
    qsl = [i * q_len for i in range(n_seqs + 1)]
    bm = prefill_block_m(q_len)
    work = torch.tensor(build_prefill_work(qsl, bm), dtype=torch.int32, device="cuda").view(-1, 2)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    ms = do_bench(
        lambda: paged_prefill_attention(q, caches[0], tables, qsl_t, seq_lens, D**-0.5, work, bm),
        warmup=25,
        rep=200,
        return_mode="median",
    )
    # causal: each query sees prefix + its own position + 1 keys; 2 matmuls of 2*D flops each
    pairs = n_seqs * sum(prefix + i + 1 for i in range(q_len))
    flops = 4 * pairs * D * HQ
    return {
        "kernel": "prefill",
        "seqs": n_seqs,
        "q_len": q_len,
        "prefix": prefix,
        "us": ms * 1e3,
        "TFLOP_per_s": flops / ms / 1e9,
        "of_bf16_peak": flops / ms / 1e-3 / H100_BF16_FLOPS,
    }


def bench_cache_write(tokens: int) -> dict[str, Any]:
    from triton.testing import do_bench

    from asyncllm.engine.kernels.cache_write import write_kv_cache

    nb = tokens // 16 + 1
    cache = torch.zeros(2, nb, 16, HKV, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tokens, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(nb * 16, device="cuda")[:tokens]
    ms = do_bench(lambda: write_kv_cache(k, v, cache, slots), return_mode="median")
    nbytes = 2 * 2 * k.numel() * 2
    return {
        "kernel": "cache_write",
        "tokens": tokens,
        "us": ms * 1e3,
        "GB_per_s": nbytes / ms / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows = []
    for batch in (1, 8, 64, 256):
        rows.append(bench_decode(batch, 100, 2048))
    rows.append(bench_decode(256, 100, 2048, bs=32))
    rows.append(bench_decode(1, 512, 512))
    if not args.quick:
        for splits in (1, 2, 4, 8, 16):
            rows.append(bench_decode(8, 100, 2048, num_splits=splits))
        for bn in (32, 128):
            rows.append(bench_decode(256, 100, 2048, block_n=bn) | {"block_n": bn})
    rows.append(bench_prefill(8, 1024, 0))
    rows.append(bench_prefill(2, 512, 3000))
    rows.append(bench_cache_write(8192))
    for r in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
