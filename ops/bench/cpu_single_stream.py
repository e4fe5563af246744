"""Single-stream decode on the CPU, the default model (SmolLM2-135M-Instruct, GGUF Q4_1 with a
Q8_0 head), in one process, variants interleaved (issue 23).

    python -m ops.bench.cpu_single_stream time   [--variants quantized,quantized:int8=0,float32]
                                                 [--tokens 128] [--rounds 3] [--out F.json]
    python -m ops.bench.cpu_single_stream cprof  [--variants quantized] [--tokens 64] [--top 25]
    python -m ops.bench.cpu_single_stream agree  [--prompts 8] [--tokens 32]
    python -m ops.bench.cpu_single_stream micro  [--rows 1,2,4,8] [--reps 200]

A variant is `float32` or `quantized` (EngineArgs.cpu_weights), optionally `:int8=R`
(ASYNCLLM_CPU_INT8_ROWS while its engine loads; without it, the environment's). `time`: every
variant's engine is built first, then `--rounds` rounds each run every variant once in order
(ABAB...), one request of `--tokens` greedy tokens (EOS ignored) on a chat prompt; ms/token =
the request's wall time / tokens (as asyncllm/bench/cpu.py's single stream) and its process CPU
time / tokens (both threads; less sensitive to other processes than wall time). `cprof`: the
functions with the most own time over one such request. `agree`: greedy outputs of the int8
activations (ASYNCLLM_CPU_INT8_ROWS=8, so the batched decode of the prompts takes that path, as
one stream does: each row is quantized alone) against the float32-activation kernel (=0).
`micro`: one gguf_linear call at the model's shapes, float32 against int8 activations, ms per
call in this thread's CPU time (torch and the kernel on 1 thread). Each prints and writes JSON
with the machine (asyncllm.bench.cpu.hardware) and the 1-minute load before and after.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from asyncllm.bench.cpu import chat_prompts, hardware, load1
from asyncllm.bench.results import git_commit

INT8_ENV = "ASYNCLLM_CPU_INT8_ROWS"


def _prompt_ids(n: int) -> list[list[int]]:
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None))
    texts = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in chat_prompts(n)
    ]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _engine(variant: str) -> Any:
    """`weights[:int8=R]` -> an LLM on the default model (ASYNCLLM_CPU_INT8_ROWS=R at its load)."""
    from asyncllm import LLM

    weights, _, opt = variant.partition(":")
    if weights not in ("float32", "quantized"):
        raise ValueError(f"variant {variant!r}: weights must be float32 or quantized")
    saved = os.environ.get(INT8_ENV)
    if opt:
        key, _, value = opt.partition("=")
        if key != "int8" or not value.isdigit():
            raise ValueError(f"variant {variant!r}: the option is int8=ROWS")
        os.environ[INT8_ENV] = value
    try:
        return LLM(None, device="cpu", dtype="float32", cpu_weights=weights)
    finally:
        if saved is None:
            os.environ.pop(INT8_ENV, None)
        else:
            os.environ[INT8_ENV] = saved


def _one_request(llm: Any, ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    from asyncllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    w0, c0 = time.perf_counter(), time.process_time()
    (out,) = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    got = list(out.outputs[0].token_ids)
    return wall * 1e3 / len(got), cpu * 1e3 / len(got), got


def run_time(args: argparse.Namespace) -> dict[str, Any]:
    variants = args.variants.split(",")
    ids = _prompt_ids(1)[0]
    warm = _prompt_ids(2)[1]
    engines = {v: _engine(v) for v in variants}
    for llm in engines.values():
        _one_request(llm, warm, 16)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for v, llm in engines.items():
            wall, cpu, got = _one_request(llm, ids, args.tokens)
            runs[v].append({"wall_ms_per_token": wall, "cpu_ms_per_token": cpu, "load1": load1()})
            outputs[v] = got
    summary = {
        v: {
            "wall_ms_per_token_median": statistics.median(r["wall_ms_per_token"] for r in rs),
            "wall_ms_per_token_min": min(r["wall_ms_per_token"] for r in rs),
            "cpu_ms_per_token_median": statistics.median(r["cpu_ms_per_token"] for r in rs),
        }
        for v, rs in runs.items()
    }
    first = outputs[variants[0]]
    same = {
        v: next((i for i, (a, b) in enumerate(zip(first, o, strict=True)) if a != b), len(o))
        for v, o in outputs.items()
    }
    for llm in engines.values():
        llm.shutdown()
    return {"runs": runs, "summary": summary, "tokens_equal_to_first_variant": same}


def run_cprof(args: argparse.Namespace) -> dict[str, Any]:
    (variant,) = args.variants.split(",")[:1]
    ids = _prompt_ids(1)[0]
    llm = _engine(variant)
    _one_request(llm, _prompt_ids(2)[1], 16)
    prof = cProfile.Profile()
    prof.enable()
    wall, cpu, _ = _one_request(llm, ids, args.tokens)
    prof.disable()
    llm.shutdown()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, calls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls_per_token": calls / args.tokens,
                "own_ms_per_token": tt * 1e3 / args.tokens,
                "cum_ms_per_token": ct * 1e3 / args.tokens,
            }
        )
    rows.sort(key=lambda r: -r["own_ms_per_token"])
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    return {"variant": variant, "wall_ms_per_token": wall, "cpu_ms_per_token": cpu,
            "top": rows[: args.top]}  # fmt: skip


def run_agree(args: argparse.Namespace) -> dict[str, Any]:
    from asyncllm import SamplingParams

    ids = _prompt_ids(args.prompts)
    sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    outs = {}
    for variant in ("quantized:int8=0", "quantized:int8=8"):
        llm = _engine(variant)
        res = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
        outs[variant] = [list(o.outputs[0].token_ids) for o in res]
        llm.shutdown()
    return {
        "reference": "quantized:int8=0",
        **agreement(outs["quantized:int8=0"], outs["quantized:int8=8"]),
    }


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Outputs identical, tokens equal at the same position, and each output's common prefix."""
    prefix = [
        next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
        for r, g in zip(ref, got, strict=True)
    ]
    same = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    total = sum(len(r) for r in ref)
    return {
        "outputs_identical": sum(p == len(r) for p, r in zip(prefix, ref, strict=True)),
        "outputs": len(ref),
        "token_agreement": same / total,
        "common_prefix": prefix,
        "common_prefix_share": sum(prefix) / total,
    }


# SmolLM2-135M's linears: (name, qtype, N, K); the head is the tied Q8_0 token_embd
SHAPES = [("qkv", "Q4_1", 960, 576), ("o", "Q4_1", 576, 576), ("gate_up", "Q4_1", 3072, 576),
          ("down", "Q4_1", 576, 1536), ("lm_head", "Q8_0", 49152, 576)]  # fmt: skip


def run_micro(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import torch

    from asyncllm.engine.kernels import cpu_quant

    torch.set_num_threads(1)
    if not cpu_quant.int8_available():
        raise SystemExit("the int8-activation path is not built on this CPU")
    g = torch.Generator().manual_seed(0)
    out = []
    for name, tname, n, k in SHAPES:
        qtype = {"Q4_1": cpu_quant.Q4_1, "Q8_0": cpu_quant.Q8_0}[tname]
        bb = cpu_quant.BLOCK_BYTES[qtype]
        blocks = torch.randint(0, 256, (n, k // 32, bb), dtype=torch.uint8, generator=g)
        blocks[..., :2] = (torch.rand(n, k // 32, 1, generator=g) * 0.01).half().view(torch.uint8)
        if qtype == cpu_quant.Q4_1:
            blocks[..., 2:4] = (
                (torch.rand(n, k // 32, 1, generator=g) * -0.05).half().view(torch.uint8)
            )
        w = cpu_quant.GGUFWeight.from_blocks(qtype, blocks.reshape(n, -1), k)
        reps = max(10, args.reps * 576 * 3072 // (n * k))
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, generator=g)
            row: dict[str, Any] = {"shape": name, "N": n, "K": k, "M": m}
            # ABAB in this thread: the two paths alternate in blocks of reps calls
            times: dict[str, list[float]] = {"f32": [], "int8": []}
            for _ in range(3):
                for path, rows in (("f32", 0), ("int8", m)):
                    wp = dataclasses.replace(w, int8_rows=rows)
                    cpu_quant.gguf_linear(x, wp)
                    t0 = time.thread_time()
                    for _ in range(reps):
                        cpu_quant.gguf_linear(x, wp)
                    times[path].append((time.thread_time() - t0) * 1e3 / reps)
            row["f32_ms"] = min(times["f32"])
            row["int8_ms"] = min(times["int8"])
            row["speedup"] = row["f32_ms"] / row["int8_ms"]
            print(json.dumps(row))
            out.append(row)
    return {"calls": out, "note": "min over 3 ABAB blocks; thread CPU time, 1 thread"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["time", "cprof", "agree", "micro"])
    ap.add_argument("--variants", default="quantized,quantized:int8=0,float32")
    ap.add_argument("--tokens", type=int, default=None, help="time 128, cprof 64, agree 32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = {"time": 128, "cprof": 64, "agree": 32}.get(args.mode, 0)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "benchmark": f"cpu_single_stream {args.mode}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": hardware(),
        "torch_threads": torch.get_num_threads(),
        "env_" + INT8_ENV: os.environ.get(INT8_ENV),
        "load1_before": load1(),
    }
    run = {"time": run_time, "cprof": run_cprof, "agree": run_agree, "micro": run_micro}
    record.update(run[args.mode](args))
    record["load1_after"] = load1()
    text = json.dumps(record, indent=1)
    if args.mode != "cprof":
        print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
