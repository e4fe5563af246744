"""A/B of the issue-17 host and sampling levers on the peer workload, asyncllm only, one engine per
shape: `python -m asyncllm.bench.levers --shape qwen3-0.6b --schedule off,on,off,on,-sampler,...`.

The workload is peer.py's (nano-vllm's bench draw: 256 requests, prompt/output U[100,1024],
temperature 0.6, EOS ignored, detokenized), run through peer_run's asyncllm engine. The engine is
built once; each lever is switched between runs on the live engine, the same switch its
environment variable sets at start-up:

- `sampler` (ASYNCLLM_SAMPLER_FUSED): Sampler._fused, the Gumbel-max kernel;
- `host` (ASYNCLLM_HOST_FASTPATH): the scheduler's and engine's bookkeeping shortcuts;
- `detok` (ASYNCLLM_DETOK_FAST): read by each new detokenizer, i.e. each request;
- `gc` (ASYNCLLM_GC_FREEZE): gc.freeze() / gc.unfreeze();
- `batch` (ASYNCLLM_PERSISTENT_BATCH): ModelRunner.persistent, the runner's persistent batch.

A schedule entry is `on` (every lever), `off` (none) or `-NAME` (every lever but NAME). Each entry
runs the throughput workload; `--latency` adds 1-stream latency (median of 3 after a warm-up) for
`off` and `on`. Prints one `RESULT {json}` line per run and a summary with ratios to `off`."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from asyncllm.bench import model
from asyncllm.bench.peer import anchor_workload
from asyncllm.bench.peer_run import _AsyncLLM

LEVERS = ("sampler", "host", "detok", "gc", "batch")


def set_levers(eng: Any, on: set[str]) -> None:
    """Switch the levers of a live LLMEngine (`LLM.llm_engine`)."""
    # The kernel is CUDA's (a CPU smoke run keeps the scan).
    eng.sampler._fused = "sampler" in on and eng.model_config.device.type == "cuda"
    eng.scheduler.fastpath = eng._fastpath = "host" in on
    os.environ["ASYNCLLM_DETOK_FAST"] = "1" if "detok" in on else "0"
    eng.runner.persistent = "batch" in on  # rank 0's runner: the A/B runs at world size 1
    # A collection after unfreezing too: it resets the collector's count of long-lived objects,
    # which decides when the next full pass runs (as in a process that never froze).
    gc.unfreeze()
    gc.collect()
    if "gc" in on:
        gc.freeze()


def parse_entry(entry: str) -> set[str]:
    if entry == "on":
        return set(LEVERS)
    if entry == "off":
        return set()
    if entry.startswith("-") and entry[1:] in LEVERS:
        return set(LEVERS) - {entry[1:]}
    if entry.startswith("+") and entry[1:] in LEVERS:
        return {entry[1:]}
    raise SystemExit(f"bad schedule entry {entry!r}: on, off, -LEVER or +LEVER ({LEVERS})")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(eng: _AsyncLLM, wl: dict[str, Any]) -> dict[str, Any]:
    prompts = [r[0] for r in wl["requests"]]
    lens = [r[1] for r in wl["requests"]]
    _sync()
    t0 = time.perf_counter()
    outs = eng.generate(prompts, lens)
    _sync()
    dt = time.perf_counter() - t0
    n = sum(k for k, _ in outs)
    if n != sum(lens) or not all(text for _, text in outs):
        raise RuntimeError(f"wrong output: {n} tokens of {sum(lens)}, or an empty text")
    return {"tok_per_s": n / dt, "elapsed_s": dt, "output_tokens": n}


def latency(eng: _AsyncLLM, wl: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for i, prompt in enumerate(wl["latency_prompts"]):
        _sync()
        t0 = time.perf_counter()
        ((n, _),) = eng.generate([prompt], [wl["latency_output_len"]])
        _sync()
        if i:
            runs.append((time.perf_counter() - t0) * 1e3 / n)
    return {"ms_per_token": statistics.median(runs), "runs_ms_per_token": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b", choices=list(model.SHAPES))
    p.add_argument("--schedule", default="off,on,off,on")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--num-requests", type=int, default=256)
    a = p.parse_args(argv)
    cfg = model.SHAPES[a.shape]
    t0 = time.perf_counter()
    mdir = model.build_model_dir(model.shape_dir(a.shape), shape=cfg)
    print(f"model dir {mdir} in {time.perf_counter() - t0:.1f} s", flush=True)
    wl = anchor_workload(cfg["vocab_size"], n=a.num_requests)
    eng = _AsyncLLM(str(mdir), wl["max_model_len"])
    print(f"engine built in {eng.start_s:.1f} s", flush=True)
    eng.generate([r[0] for r in wl["requests"][:8]], [4] * 8)  # warm-up
    entries = a.schedule.split(",")
    results: list[dict[str, Any]] = []
    lat_done: set[str] = set()
    for entry in entries:
        on = parse_entry(entry)
        set_levers(eng.llm.llm_engine, on)
        rec: dict[str, Any] = {"shape": a.shape, "config": entry, "levers_on": sorted(on)}
        rec.update(throughput(eng, wl))
        if a.latency and entry in ("on", "off") and entry not in lat_done:
            rec.update(latency(eng, wl))
            lat_done.add(entry)
        print("RESULT " + json.dumps(rec), flush=True)
        results.append(rec)
    off = [r["tok_per_s"] for r in results if r["config"] == "off"]
    base = statistics.mean(off) if off else None
    for r in results:
        ratio = f"{r['tok_per_s'] / base:.3f}" if base else "-"
        lat = f", {r['ms_per_token']:.3f} ms/token" if "ms_per_token" in r else ""
        print(f"{a.shape} {r['config']:>9}: {r['tok_per_s']:8.0f} tok/s, x{ratio} of off{lat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
