"""The asyncllm side of the GPU benchmarks: the offline LLM API for throughput, the sync engine's
step loop for single-stream latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from asyncllm.bench.workloads import Request


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_llm(model_dir: Path, **engine_kw: Any):
    from asyncllm import LLM

    t0 = time.perf_counter()
    llm = LLM(str(model_dir), **engine_kw)
    return llm, time.perf_counter() - t0


def run_throughput(
    llm, reqs: list[Request], temperature: float = 0.0, detokenize: bool = False
) -> dict[str, Any]:
    from asyncllm import SamplingParams

    def params(n: int):
        return SamplingParams(
            max_tokens=n, ignore_eos=True, temperature=temperature, detokenize=detokenize
        )

    # Warm-up on a few requests of the workload's own sizes: compiles the prefill kernels.
    warm = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs[:8]]
    llm.generate(warm, params(4), use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    plist = [params(r.max_tokens) for r in reqs]
    before = llm.llm_engine.get_stats()
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, plist, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - t0
    after = llm.llm_engine.get_stats()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    want = sum(r.max_tokens for r in reqs)
    if n_out != want:
        raise RuntimeError(f"generated {n_out} tokens, the workload asks for {want}")
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "prompt_tokens": n_in,
        "output_tok_per_s": n_out / elapsed,
        "total_tok_per_s": (n_out + n_in) / elapsed,
        "engine_steps": after.num_steps - before.num_steps,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "kv_blocks_total": after.kv_blocks_total,
    }


def run_latency(
    llm, reqs: list[Request], temperature: float = 0.0, detokenize: bool = False
) -> dict[str, Any]:
    """One request at a time; reqs[0] is a warm-up. Each request has its own prompt, so no run
    is served from the prefix cache that an earlier run filled."""
    from asyncllm import SamplingParams

    engine = llm.llm_engine
    runs = []
    for i, req in enumerate(reqs):
        params = SamplingParams(
            max_tokens=req.max_tokens,
            ignore_eos=True,
            temperature=temperature,
            detokenize=detokenize,
        )
        engine.add_request(f"lat-{i}", {"prompt_token_ids": req.prompt_token_ids}, params)
        stamps: list[float] = []
        _sync()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                stamps += [time.perf_counter()] * (n - len(stamps))
        if len(stamps) != req.max_tokens:
            raise RuntimeError(f"got {len(stamps)} tokens, asked for {req.max_tokens}")
        if i:
            runs.append(
                {
                    "ms_per_token": (stamps[-1] - t0) * 1e3 / len(stamps),
                    "ttft_ms": (stamps[0] - t0) * 1e3,
                    "tpot_ms": (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1),
                }
            )
    best = sorted(runs, key=lambda r: r["ms_per_token"])[len(runs) // 2]  # the median run
    return {
        **best,
        "runs": runs,
        "ms_per_token_spread": [
            min(r["ms_per_token"] for r in runs),
            max(r["ms_per_token"] for r in runs),
        ],
        "median_of": len(runs),
        "statistic": "median run",
        "mean_ms_per_token": statistics.mean(r["ms_per_token"] for r in runs),
    }
