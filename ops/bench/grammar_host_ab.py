"""Per-step host cost of constrained decoding on the CPU, for an A/B of two trees (issue 16).

    PYTHONPATH=<tree> python ops/bench/grammar_host_ab.py --model DIR [--kind story] [--profile]

Runs 64 streams under `kind` (asyncllm.bench.grammar's schemas, or `free`) with async
scheduling, the GPU's order, on a model whose forward is cheap (build one with `--build DIR`:
two layers, SmolLM2's 49152-token vocabulary and tokenizer), so that the step is mostly host
work, as on the H200. Only the public LLM API and LLMEngine.step are used, so the same script
measures an older tree. Per step: the engine thread's CPU time (thread_time: what lies on the
host's critical path; a fill on the grammar's worker thread is not in it), the process's CPU time
(every thread) and the wall time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

SMALL = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)


def build(out: Path, tokenizer_dir: Path) -> None:
    from asyncllm.bench.model import build_model_dir

    build_model_dir(out, shape=SMALL, device="cpu")
    for f in out.glob("*token*"):  # build_model_dir's word-level tokenizer: no '{' to match
        f.unlink()
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--build", help="write the small model here and exit")
    p.add_argument("--tokenizer", default="/work/main/.carry/xg/smollm2-tokenizer")
    p.add_argument("--kind", default="story", choices=["story", "items", "free"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    if a.build:
        build(Path(a.build), Path(a.tokenizer))
        return

    from asyncllm import LLM, SamplingParams
    from asyncllm.bench.grammar import SCHEMAS, _prompts
    from asyncllm.sampling_params import StructuredOutputsParams

    llm = LLM(a.model, device="cpu", async_scheduling=True, max_model_len=1024)
    engine = llm.llm_engine
    so = None if a.kind == "free" else StructuredOutputsParams(json=SCHEMAS[a.kind])
    prompts = _prompts(a.streams)

    def params(n: int) -> list:
        return [
            SamplingParams(
                temperature=1.0, seed=i, max_tokens=n, ignore_eos=True, structured_outputs=so
            )
            for i in range(len(prompts))
        ]

    llm.chat(prompts, params(4), use_tqdm=False)  # warm-up: compile, matchers, the worker
    thread_t, proc_t, wall_t = [], [], []
    step = engine.step

    def timed_step():
        t0, c0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        out = step()
        thread_t.append(time.thread_time() - t0)
        proc_t.append(time.process_time() - c0)
        wall_t.append(time.perf_counter() - w0)
        return out

    engine.step = timed_step
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    outs = llm.chat(prompts, params(a.max_tokens), use_tqdm=False)
    if prof is not None:
        prof.disable()
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    # steps where all 64 rows decode (the prompt steps and the last ones excluded)
    k = slice(2, -2)

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs[k]) * 1e3, 3)

    rec = {
        "tree": os.environ.get("PYTHONPATH", "").split(":")[-1],
        "kind": a.kind,
        "steps": len(wall_t),
        "tokens": n_tok,
        "thread_ms_per_step": ms(thread_t),
        "process_ms_per_step": ms(proc_t),
        "wall_ms_per_step": ms(wall_t),
        "load1": round(os.getloadavg()[0], 2),
    }
    if prof is not None:
        import pstats

        st = pstats.Stats(prof)
        per: dict[str, float] = {}
        for (file, _line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            if fn in (
                "_bitmask",
                "_sample",
                "_resolve",
                "_append_token",
                "accept_token",
                "is_terminated",
                "batch_fill_next_token_bitmask",
                "accept",
                "fill",
                "fill_async",
                "result",
                "_accept_grammar",
                "_start_mask",
                "launch",
            ) and (
                "grammar" in file or "llm_engine" in file or "matcher" in file or "sampler" in file
            ):
                key = f"{Path(file).stem}.{fn}"
                per[key] = round(per.get(key, 0.0) + ct * 1e3 / len(wall_t), 3)
        rec["cum_ms_per_step"] = dict(sorted(per.items()))
    print(json.dumps(rec), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
