"""Overhead of constrained decoding: the same 64 streams with and without a grammar.

    python -m asyncllm.bench.grammar [--device cpu|cuda] [--streams 64] [--max-tokens 64] [--rounds 2]

Both runs sample at temperature 1.0 with per-request seeds and ignore EOS, so every stream runs
to max_tokens and the two tok/s figures count the same work. Two constraints, each too long for max_tokens
to complete, so no constrained stream finishes early either and every step fills and applies a
bitmask for all 64 rows: `story`, a JSON string with a minLength (most tokens allowed each step),
and `items`, a long array of small objects (mostly structure: few tokens allowed). The record's
value is the worse of the two. `items/2` is the mix: the even-numbered half of the streams under
`items`, the other half free, in one batch (the free rows must pay nothing). Rounds
alternate (A B A B ...) against drift on a shared machine; the record is the median of each.
A micro figure beside it: the host fill plus the batched apply of one step's 64-row bitmask,
inside a JSON string (most tokens allowed) and at a structural position (few allowed);
`--micro-only` measures just that (tokenizer only, no model), for a machine too busy for tok/s.
Target: constrained >= 0.95x unconstrained tok/s. Writes results/grammar-<cpu|gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from asyncllm.bench import results

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000, "maxLength": 4000}},
    "required": ["story"],
    "additionalProperties": False,
}
# The other extreme: mostly structure (keys, numbers, booleans), few tokens allowed per step;
# 100 items take far more than max_tokens, so no stream finishes early here either.
ITEMS_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
SCHEMAS = {"story": SCHEMA, "items": ITEMS_SCHEMA}


def _prompts(n: int) -> list[list[dict[str, str]]]:
    topics = ["a cat", "the sea", "a robot", "winter", "a city", "music", "a garden", "trains"]
    return [
        [
            {
                "role": "user",
                "content": f"Write a JSON object with a long story about {topics[i % 8]}.",
            }
        ]
        for i in range(n)
    ]


def _run(llm: Any, prompts: list, schema: str | None, max_tokens: int) -> dict[str, Any]:
    from asyncllm import SamplingParams
    from asyncllm.sampling_params import StructuredOutputsParams

    half = schema is not None and schema.endswith("/2")  # the mix: even-numbered streams only
    name = schema.removesuffix("/2") if schema is not None else None
    so = StructuredOutputsParams(json=SCHEMAS[name]) if name is not None else None
    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=max_tokens,
            ignore_eos=True,
            structured_outputs=so if not half or i % 2 == 0 else None,
        )
        for i in range(len(prompts))
    ]
    t0 = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    reasons = sorted({o.outputs[0].finish_reason for o in outs})
    if name is not None and max_tokens >= 8:
        head = '{"story": "' if name == "story" else '{"items": [{"id": '
        bad = [
            o.outputs[0].text[:40]
            for o, sp in zip(outs, params, strict=True)
            # a short run may stop inside the head: then its text is a prefix of it
            if sp.structured_outputs is not None
            and not (o.outputs[0].text.startswith(head) or head.startswith(o.outputs[0].text))
        ]
        assert not bad, f"constrained outputs that do not follow the schema: {bad[:3]}"
    return {"elapsed_s": elapsed, "output_tokens": n, "tok_per_s": n / elapsed, "reasons": reasons}


def _micro(g: Any, vocab_size: int, device: Any, streams: int, reps: int = 20) -> dict[str, float]:
    """One step's bitmask for `streams` rows: host fill, then the batched apply; inside a JSON
    string (most tokens allowed) and at a structural position (few allowed)."""

    from asyncllm.sampling_params import StructuredOutputsParams

    compiled = g.compile(StructuredOutputsParams(json=SCHEMA))
    out: dict[str, float] = {}
    for where, prefix in (("in_string", '{"story": "Once'), ("structural", "{")):
        matchers = [g.matcher(compiled) for _ in range(streams)]
        for m in matchers:
            m.accept_string(prefix)
        out.update(_time_step(g, matchers, vocab_size, device, streams, reps, where))
    out.update(_accept_and_overlap(g, compiled, streams, reps))
    return out


def _busy(n: int) -> int:
    """Pure-Python work holding the GIL, the stand-in for a resolve's per-token work."""
    x = 0
    for i in range(n):
        x += i & 7
    return x


def _accept_and_overlap(g: Any, compiled: Any, streams: int, reps: int) -> dict[str, float]:
    """Inside a JSON string, per step of `streams` rows: the tokens' accept one matcher at a
    time (with is_terminated, as the engine did) against GrammarBackend.accept's one call; and
    the fill beside Python work of about the fill's own length, serial against fill_async (the
    worker thread: xgrammar releases the GIL, the GIL's switch interval is lowered meanwhile)."""
    matchers = [g.matcher(compiled) for _ in range(streams)]
    for m in matchers:
        m.accept_string('{"story": "Once')

    def stays_in_string(t: int) -> bool:  # a closing quote would be refused the second time
        f = matchers[0].fork()
        return all(f.accept_token(t) for _ in range(3))

    tok = next(t for t in range(300, g.vocab_size) if stays_in_string(t))
    toks = [tok] * streams
    idx = list(range(streams))
    rowwise, batch, fill, serial, overlap, work = [], [], [], [], [], []
    g.fill(streams, matchers, idx)
    n_busy = 1000
    for r in range(reps):
        t0 = time.perf_counter()
        for m in matchers[: streams // 2]:
            m.accept_token(tok)
            m.is_terminated()
        t1 = time.perf_counter()
        g.accept(matchers[streams // 2 :], toks[streams // 2 :])
        t2 = time.perf_counter()
        g.accept(matchers[: streams // 2], toks[: streams // 2])  # all rows at the same place
        for m in matchers[streams // 2 :]:
            m.accept_token(tok)
            m.is_terminated()
        rowwise.append(t1 - t0)
        batch.append(t2 - t1)
        t0 = time.perf_counter()
        g.fill(streams, matchers, idx)
        t1 = time.perf_counter()
        _busy(n_busy)
        t2 = time.perf_counter()
        pending = g.fill_async(streams, matchers, idx)
        _busy(n_busy)
        pending.result()
        t3 = time.perf_counter()
        fill.append(t1 - t0)
        work.append(t2 - t1)
        serial.append(t2 - t0)
        overlap.append(t3 - t2)
        if r == 2:  # calibrate the work to the fill's length
            n_busy = max(100, int(n_busy * statistics.median(fill) / statistics.median(work)))
    k = slice(3, None)

    def ms(xs: list[float], scale: float = 1.0) -> float:
        return round(statistics.median(xs[k]) * 1e3 * scale, 3)

    return {
        "accept_rowwise_ms": ms(rowwise, 2.0),  # timed on half the rows
        "accept_batch_ms": ms(batch, 2.0),
        "overlap_fill_ms": ms(fill),
        "overlap_work_ms": ms(work),
        "overlap_serial_ms": ms(serial),
        "overlap_async_ms": ms(overlap),
    }


def _profile(llm: Any, prompts: list, max_tokens: int) -> None:
    """Where the host time of a run goes, unconstrained then constrained (printed)."""
    import cProfile
    import pstats

    for kind in (None, "story"):
        prof = cProfile.Profile()
        prof.enable()
        res = _run(llm, prompts, kind, max_tokens)
        prof.disable()
        print(f"== profile {kind or 'unconstrained'}: {res['tok_per_s']:.0f} tok/s", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def _thread_sweep(g: Any, rows: tuple[int, ...] = (64, 256)) -> dict[str, float]:
    """Host fill time of one step's mask by xgrammar thread count (ASYNCLLM_GRAMMAR_THREADS),
    inside a JSON string: what the default thread rule (grammar.fill_threads) is chosen from."""
    import os

    from asyncllm.sampling_params import StructuredOutputsParams

    compiled = g.compile(StructuredOutputsParams(json=SCHEMA))
    cores = len(os.sched_getaffinity(0))
    out: dict[str, float] = {}
    saved = os.environ.get("ASYNCLLM_GRAMMAR_THREADS")
    try:
        for n in rows:
            matchers = [g.matcher(compiled) for _ in range(n)]
            for m in matchers:
                m.accept_string('{"story": "Once')
            idx = list(range(n))
            for t in sorted({1, 2, 4, 8, 16, max(1, cores // 2)}):
                if t > cores:
                    continue
                os.environ["ASYNCLLM_GRAMMAR_THREADS"] = str(t)
                times = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    g.fill(n, matchers, idx)
                    times.append(time.perf_counter() - t0)
                out[f"rows{n}_threads{t}_ms"] = round(statistics.median(times[5:]) * 1e3, 3)
            del matchers
    finally:
        if saved is None:
            os.environ.pop("ASYNCLLM_GRAMMAR_THREADS", None)
        else:
            os.environ["ASYNCLLM_GRAMMAR_THREADS"] = saved
    return out


def _time_step(
    g: Any, matchers: list, vocab_size: int, device: Any, streams: int, reps: int, where: str
) -> dict[str, float]:
    import torch

    from asyncllm.engine.grammar import apply_bitmask

    logits = torch.randn(streams, vocab_size, device=device)
    idx = list(range(streams))
    fill, apply = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        bm = g.fill(streams, matchers, idx)
        t1 = time.perf_counter()
        apply_bitmask(logits, bm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
    return {
        f"{where}_fill_ms": round(statistics.median(fill) * 1e3, 3),
        f"{where}_apply_ms": round(statistics.median(apply) * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    p.add_argument(
        "--micro-only",
        action="store_true",
        help="only the step-bitmask timing (tokenizer, no model): for a machine too busy for tok/s",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, cProfile one unconstrained and one constrained run (top functions)",
    )
    args = p.parse_args(argv)

    from asyncllm import LLM, SamplingParams

    if args.micro_only:
        return _micro_only(args)

    llm = LLM(args.model, device=args.device)
    prompts = _prompts(args.streams)
    # warm-up: the model, the grammar backend and the schema's compilation
    llm.chat(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    kinds: list[str | None] = [None, "story", "items", "items/2"]
    for k in kinds[1:]:
        _run(llm, prompts[:2], k, 4)
    runs: dict[str | None, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            res = _run(llm, prompts, kind, args.max_tokens)
            runs[kind].append(res)
            print(f"{kind or 'free':6}", res, flush=True)
    free = statistics.median(x["tok_per_s"] for x in runs[None])
    per = {k: statistics.median(x["tok_per_s"] for x in runs[k]) for k in kinds[1:]}
    # the worse of the all-constrained runs is the record's value; the mix is reported beside it
    cons = min(v for k, v in per.items() if not k.endswith("/2"))
    engine = llm.llm_engine
    micro = _micro(engine.grammar, engine.vocab_size, engine.model_config.device, args.streams)
    if args.profile:
        _profile(llm, prompts, args.max_tokens)
    sweep = _thread_sweep(engine.grammar)
    print("fill by threads:", sweep, flush=True)
    ratio = cons / free
    rec = results.record(
        "grammar_overhead",
        cons,
        "tok/s",
        "unconstrained",
        free,
        None,
        streams=args.streams,
        max_tokens=args.max_tokens,
        device=args.device,
        overhead_pct=round((1 - ratio) * 100, 2),
        constrained_tok_per_s=per,
        ratio_per_schema={k: round(v / free, 4) for k, v in per.items()},
        target="constrained >= 0.95x unconstrained tok/s",
        target_met=ratio >= 0.95,
        step_bitmask_ms=micro,
        fill_threads_ms=sweep,
        runs={k or "unconstrained": v for k, v in runs.items()},
        load1_end=round(__import__("os").getloadavg()[0], 2),
    )
    path = results.write(rec, "grammar", Path(args.out))
    print(f"unconstrained {free:.1f} tok/s, constrained {per} tok/s: worst ratio {ratio:.3f}")
    print(f"step bitmask at {args.streams} rows: {micro}")
    print("wrote", path)
    return path


def _micro_only(args: argparse.Namespace) -> Path:
    import os

    import torch

    from asyncllm.engine.grammar import GrammarBackend
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(args.model))
    vocab = len(tok)
    g = GrammarBackend(tok, vocab, [tok.eos_token_id])
    micro = _micro(g, vocab, torch.device(args.device), args.streams)
    rec = results.record(
        "grammar_step_bitmask",
        micro["in_string_fill_ms"] + micro["in_string_apply_ms"],
        "ms",
        None,
        None,
        None,
        streams=args.streams,
        device=args.device,
        step_bitmask_ms=micro,
        fill_threads_ms=_thread_sweep(g),
        load1=round(os.getloadavg()[0], 2),
    )
    path = results.write(rec, "grammar-micro", Path(args.out))
    print(f"step bitmask at {args.streams} rows: {micro}")
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
