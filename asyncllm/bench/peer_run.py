"""One engine of the peer benchmark in a process of its own (so each engine has the GPU to itself):
`python -m asyncllm.bench.peer_run asyncllm|nano-vllm MODEL_DIR WORKLOAD_JSON [--what throughput,latency]`.

Both engines run the same steps on their own offline API: a warm-up on the workload's first 8
prompts, then the 256 requests in one `generate` call (temperature 0.6, EOS ignored, text
detokenized the way each engine gives it to a user), then single-stream latency: one warm-up and
three timed runs of 256 prompt / 256 output tokens, each with its own prompt (no prefix-cache
hits). Prints one `RESULT {json}` line per measurement."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

TEMPERATURE = 0.6


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _emit(rec: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(rec), flush=True)


class _AsyncLLM:
    name = "asyncllm"

    def __init__(self, model_dir: str, max_model_len: int, **engine_kw: Any) -> None:
        from asyncllm import LLM, SamplingParams

        self._sp = SamplingParams
        t0 = time.perf_counter()
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # the CPU: smoke runs
        self.llm = LLM(model_dir, dtype=dtype, max_model_len=max_model_len, **engine_kw)
        self.start_s = time.perf_counter() - t0

    def params(self, max_tokens: int):
        return self._sp(temperature=TEMPERATURE, ignore_eos=True, max_tokens=max_tokens)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[int, str]]:
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [self.params(m) for m in max_tokens],
            use_tqdm=False,
        )
        return [(len(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


class _NanoVLLM:
    name = "nano-vllm+fa4"

    def __init__(self, model_dir: str, max_model_len: int) -> None:
        from nanovllm import LLM, SamplingParams

        self._sp = SamplingParams
        t0 = time.perf_counter()
        self.llm = LLM(model_dir, enforce_eager=False, max_model_len=max_model_len)
        self.start_s = time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[int, str]]:
        sps = [self._sp(temperature=TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        return [(len(o["token_ids"]), o["text"]) for o in outs]


def run(engine_name: str, model_dir: str, workload: dict[str, Any], what: set[str]) -> None:
    cls = _AsyncLLM if engine_name == "asyncllm" else _NanoVLLM
    measure(cls(model_dir, workload["max_model_len"]), workload, what)


def measure(eng: Any, workload: dict[str, Any], what: set[str]) -> None:
    """The throughput and latency runs on a built engine (`name`, `start_s`, `generate`)."""
    cls = type(eng)
    base = {"engine": eng.name, "engine_start_s": round(eng.start_s, 2)}
    if "throughput" in what:
        prompts = [r[0] for r in workload["requests"]]
        outs_len = [r[1] for r in workload["requests"]]
        eng.generate(prompts[:8], [4] * 8)  # warm-up: compiles kernels of the workload's sizes
        _sync()
        t0 = time.perf_counter()
        outs = eng.generate(prompts, outs_len)
        _sync()
        elapsed = time.perf_counter() - t0
        n = sum(k for k, _ in outs)
        if n != sum(outs_len):
            raise RuntimeError(
                f"{cls.name} generated {n} tokens, the workload asks {sum(outs_len)}"
            )
        if not all(text for _, text in outs):
            raise RuntimeError(f"{cls.name} returned an empty text: detokenization did not run")
        _emit(
            {
                **base,
                "kind": "throughput",
                "output_tokens": n,
                "elapsed_s": elapsed,
                "tok_per_s": n / elapsed,
            }
        )
    if "latency" in what:
        runs = []
        for i, prompt in enumerate(workload["latency_prompts"]):
            _sync()
            t0 = time.perf_counter()
            ((n, _),) = eng.generate([prompt], [workload["latency_output_len"]])
            _sync()
            if i:  # the first is a warm-up
                runs.append((time.perf_counter() - t0) * 1e3 / n)
        _emit(
            {
                **base,
                "kind": "latency",
                "ms_per_token": statistics.median(runs),
                "runs_ms_per_token": runs,
            }
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["asyncllm", "nano-vllm"])
    p.add_argument("model_dir")
    p.add_argument("workload")
    p.add_argument("--what", default="throughput,latency")
    a = p.parse_args(argv)
    with open(a.workload) as f:
        workload = json.load(f)
    run(a.engine, a.model_dir, workload, set(a.what.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
