"""python -m asyncllm.bench.moe_tune [--quick] [--out DIR]: block sizes for the fused-MoE kernel on
this GPU, per token count M, for one layer shape (default Qwen3-30B-A3B's: 128 experts, top-8,
hidden 2048, moe_intermediate 768, bf16).

For each M a random uniform routing (as the benchmark's random weights give) is timed with every
candidate config (routing kernel excluded: sort, gate/up, down, sum), each in a CUDA graph of
20 calls; the fastest is kept. Prints per M the best time, the default table's time and the rate
at which the experts hit were read (bytes of E_hit experts / time), and writes
DIR/<kernels.fused_moe.config_file_name(...)>, the file kernels/moe_configs/ takes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from asyncllm.bench.moe import expected_experts_hit

M_LIST = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def candidates(m: int, num_experts: int, top_k: int, quick: bool) -> list[dict[str, int]]:
    rows = m * top_k / num_experts
    block_ms = [b for b in (16, 32, 64, 128) if b <= max(16, 4 * rows)]
    grid = itertools.product(
        block_ms,
        (64, 128) if quick else (32, 64, 128),
        (64, 128) if quick else (64, 128, 256),
        (1,) if rows < 16 else ((8,) if quick else (1, 8)),
        (4,) if quick else (4, 8),
        (3, 4) if quick else (2, 3, 4, 5),
    )
    return [
        dict(BLOCK_M=a, BLOCK_N=b, BLOCK_K=c, GROUP_M=d, num_warps=w, num_stages=s)
        for a, b, c, d, w, s in grid
    ]


def time_config(fn, reps: int = 20) -> float:
    """Seconds per call: `reps` calls captured in one CUDA graph, median of 5 replays."""
    fn()  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    del g
    return sorted(times)[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench.moe_tune", description=__doc__)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--m", default=",".join(map(str, M_LIST)))
    p.add_argument("--quick", action="store_true", help="a smaller grid (a few minutes)")
    p.add_argument("--out", default=".")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop trying configs after this")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_tune needs a CUDA GPU", file=sys.stderr)
        return 2
    from asyncllm.engine.kernels import fused_moe as fm

    e, k, h, i = a.experts, a.top_k, a.hidden, a.inter
    dt = torch.bfloat16
    torch.manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=dt) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=dt) * 0.02
    expert_bytes = 3 * h * i * 2
    t0 = time.perf_counter()
    best_table: dict[str, dict[str, int]] = {}
    print(f"{'M':>6} {'best us':>9} {'default us':>11} {'TB/s':>6}  best config", flush=True)
    for m in (int(x) for x in a.m.split(",")):
        x = torch.randn(m, h, device="cuda", dtype=dt)
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(m)]).int()
        w = torch.softmax(torch.randn(m, k, device="cuda"), -1)
        default = fm._default_config(m, e, k)
        results = []
        for cfg in [default] + candidates(m, e, k, a.quick):
            if time.perf_counter() - t0 > a.budget_s and results:
                break
            try:
                s = time_config(functools.partial(fm.fused_moe, x, w13, w2, w, ids, config=cfg))
            except Exception as exc:  # out of shared memory / registers for this config
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            results.append((s, cfg))
        best_s, best = min(results, key=lambda r: r[0])
        default_s = results[0][0]
        hit = expected_experts_hit(m, e, k)
        print(
            f"{m:>6} {best_s * 1e6:>9.1f} {default_s * 1e6:>11.1f} "
            f"{hit * expert_bytes / best_s / 1e12:>6.2f}  {best}",
            flush=True,
        )
        best_table[str(m)] = best
    out = Path(a.out) / fm.config_file_name(e, i, h, dt, fm.device_slug())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(best_table, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
