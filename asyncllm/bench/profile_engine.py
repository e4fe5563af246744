"""Where a throughput run's time goes: the GPU time of each step's forward (CUDA events around
the graph replay or the eager model call) against the wall time, and cProfile's top host
functions. python -m asyncllm.bench.profile_engine [--requests 256] [--top 30]"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from asyncllm.bench import engine_runs, model, workloads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--no-cprofile", action="store_true")
    args = p.parse_args()
    mdir = model.build_model_dir()
    llm, _ = engine_runs.make_llm(mdir, dtype="bfloat16")
    runner = llm.llm_engine.runner
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(kind, fn):
        def wrapper(*a, **kw):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn(*a, **kw)
            e.record()
            events.append((kind, s, e))
            return out

        return wrapper

    gr = runner.graph_runner
    gr.run = timed("decode", gr.run)
    runner.model.forward = timed("eager", runner.model.forward)
    reqs = workloads.throughput_workload(n=args.requests)
    engine_runs.run_throughput(llm, reqs[:8])  # warm-up
    events.clear()
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if args.no_cprofile:
        res = engine_runs.run_throughput(llm, reqs)
    else:
        prof.enable()
        res = engine_runs.run_throughput(llm, reqs)
        prof.disable()
    wall = time.perf_counter() - t0
    torch.cuda.synchronize()
    gpu = {"decode": 0.0, "eager": 0.0}
    count = {"decode": 0, "eager": 0}
    for kind, s, e in events:
        gpu[kind] += s.elapsed_time(e) / 1e3
        count[kind] += 1
    print(
        f"wall {wall:.2f} s (run_throughput says {res['elapsed_s']:.2f}), {res['output_tok_per_s']:.0f} tok/s"
    )
    for k in gpu:
        print(f"  forward GPU time, {k}: {gpu[k]:.2f} s over {count[k]} steps")
    print(f"  everything else (host work not overlapped): {wall - sum(gpu.values()):.2f} s")
    if not args.no_cprofile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
