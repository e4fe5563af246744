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
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(model.SHAPES))
    p.add_argument("--temperature", type=float, default=0.0, help="0.6 is the peer's workload")
    p.add_argument("--detokenize", action="store_true", help="text as users get it (the peer's)")
    p.add_argument(
        "--kernels",
        type=int,
        default=0,
        help="also run torch.profiler over this many requests and print the top CUDA kernels",
    )
    args = p.parse_args()
    mdir = model.build_model_dir(model.shape_dir(args.shape), shape=model.SHAPES[args.shape])
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
    run_kw = {"temperature": args.temperature, "detokenize": args.detokenize}
    engine_runs.run_throughput(llm, reqs[:8], **run_kw)  # warm-up
    events.clear()
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if args.no_cprofile:
        res = engine_runs.run_throughput(llm, reqs, **run_kw)
    else:
        prof.enable()
        res = engine_runs.run_throughput(llm, reqs, **run_kw)
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
    if args.kernels:
        _kernel_table(llm, reqs[: args.kernels], run_kw, args.top)


def _kernel_table(llm, reqs, run_kw: dict, top: int) -> None:
    """GPU time by kernel over a smaller run: which kernels (GEMM, attention, sampling, copies)
    the steps are made of."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine_runs.run_throughput(llm, reqs, **run_kw)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))


if __name__ == "__main__":
    main()
