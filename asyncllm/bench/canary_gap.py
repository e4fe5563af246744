"""Head-of-line blocking: the worst inter-token gap of a running stream (the canary) while a long
prompt is prefilled beside it, against the canary's normal gap.

    python -m asyncllm.bench.canary_gap --prompt-tokens 2048 4096 8191
    python -m asyncllm.bench.canary_gap --max-prefill-tokens 8192   # no cap, for comparison
    python -m asyncllm.bench.canary_gap --flat   # the cap without context pricing

The canary decodes alone for `--warm` seconds (its median gap is the normal one); then each long
prompt (random token ids, one output token) is added and the canary's largest gap until that
prompt's first token is recorded. Target on the CPU (issue 22): worst <= 4x normal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time


async def run(args: argparse.Namespace) -> list[dict]:
    from asyncllm import AsyncLLMEngine, EngineArgs, SamplingParams
    from asyncllm.engine.llm_engine import LLMEngine

    ea = EngineArgs(model=args.model, max_prefill_tokens=args.max_prefill_tokens, seed=0)
    llm_engine = LLMEngine.from_engine_args(ea)
    scale = _set_pricing(llm_engine, args)
    engine = AsyncLLMEngine(engine=llm_engine)
    await engine.start()
    vocab = getattr(engine, "vocab_size", None) or len(engine.tokenizer)
    stamps: list[float] = []

    async def canary(tag: str) -> None:
        # As long as the model allows: a canary that ends while the long prompt is prefilled
        # would turn the rest of the prefill into one "gap" (an 8000-token prompt beside a
        # decode takes minutes on the CPU).
        room = llm_engine.model_config.max_model_len - 4
        sp = SamplingParams(temperature=0, max_tokens=room, ignore_eos=True)
        async for out in engine.generate({"prompt_token_ids": [1, 2, 3, 4]}, sp, tag):
            stamps.append(time.perf_counter())
            if out.finished:
                return

    rows = []
    task: asyncio.Future | None = None
    try:
        rng = random.Random(0)
        for i, n in enumerate(args.prompt_tokens):
            # A fresh canary per long prompt: its context starts short each time.
            if task is not None:
                task.cancel()
            stamps.clear()
            task = asyncio.ensure_future(canary(f"canary-{i}"))
            await asyncio.sleep(args.warm)
            # The normal gap: this canary's next tokens, before the long prompt arrives.
            s0 = len(stamps)
            deadline = time.perf_counter() + 120
            while len(stamps) < s0 + args.normal_tokens + 1 and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            normal = _gaps(stamps[s0:])
            start = len(stamps)
            t0 = time.perf_counter()
            ids = [rng.randrange(vocab) for _ in range(n)]
            sp = SamplingParams(temperature=0, max_tokens=1)
            async for _ in engine.generate({"prompt_token_ids": ids}, sp, f"long-{n}"):
                pass
            t1 = time.perf_counter()
            if task.done():
                raise RuntimeError(f"the canary ended before the {n}-token prompt's first token")
            during = [t0] + [t for t in stamps[start:] if t <= t1] + [t1]
            worst = max(_gaps(during))
            med = statistics.median(normal)
            row = {
                "prompt_tokens": n,
                "max_prefill_tokens": args.max_prefill_tokens or "default",
                "prefill_context_scale": scale,
                "normal_gap_ms": round(med * 1e3, 1),
                "worst_gap_ms": round(worst * 1e3, 1),
                "ratio": round(worst / med, 2),
                "prefill_s": round(t1 - t0, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if task is not None:
            task.cancel()
        await engine.shutdown()
    return rows


def step_costs(args: argparse.Namespace) -> list[dict]:
    """The same question one engine step at a time (LLMEngine, no event loop): the canary's
    decode-only step against each step of a long prompt's prefill beside it."""
    from asyncllm import LLM, SamplingParams

    eng = LLM(model=args.model, max_prefill_tokens=args.max_prefill_tokens, seed=0).llm_engine
    scale = _set_pricing(eng, args)
    sp = SamplingParams(temperature=0, max_tokens=args.canary_tokens, ignore_eos=True)
    eng.add_request("canary", {"prompt_token_ids": [1, 2, 3, 4]}, sp)

    def timed() -> float:
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    for _ in range(5):
        eng.step()
    rows = []
    rng = random.Random(0)
    for n in args.prompt_tokens:
        normal = statistics.median(timed() for _ in range(10))
        ids = [rng.randrange(eng.vocab_size) for _ in range(n)]
        eng.add_request(f"long-{n}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=1))
        steps = []
        while f"long-{n}" in eng.requests:
            steps.append(timed())
        row = {
            "prompt_tokens": n,
            "max_prefill_tokens": eng.scheduler.config.max_prefill_tokens,
            "prefill_context_scale": scale,
            "normal_step_ms": round(normal * 1e3, 1),
            "worst_step_ms": round(max(steps) * 1e3, 1),
            "first_chunk_ratio": round(steps[0] / normal, 2),
            "ratio": round(max(steps) / normal, 2),
            "prefill_s": round(sum(steps), 2),
            "steps": len(steps),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _set_pricing(eng, args: argparse.Namespace) -> int | None:
    """--flat: the flat token cap (no context pricing), the schedule before it, as the anchor."""
    if args.flat:
        eng.scheduler.config.prefill_context_scale = None
    return eng.scheduler.config.prefill_context_scale


def _gaps(ts: list[float]) -> list[float]:
    return [b - a for a, b in zip(ts, ts[1:], strict=False)] or [0.0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--max-prefill-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--warm", type=float, default=3.0)
    ap.add_argument("--canary-tokens", type=int, default=4000)
    ap.add_argument(
        "--normal-tokens", type=int, default=12, help="canary gaps the normal one is the median of"
    )
    ap.add_argument(
        "--flat", action="store_true", help="a prompt token costs 1 at any context (the old cap)"
    )
    ap.add_argument("--steps", action="store_true", help="time engine steps (no event loop)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = step_costs(args) if args.steps else asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
