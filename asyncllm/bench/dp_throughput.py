"""Data-parallel scaling: the throughput workload (DESIGN.md section 6: 256 requests, prompt and
output lengths uniform in [100, 1024], random ids, EOS ignored, Qwen3-0.6B shape, random bf16
weights) through DataParallelEngine with 1 engine, then with N (one per GPU), all requests
submitted at once; output tok/s of each and the ratio.

    python -m asyncllm.bench.dp_throughput --sizes 1,2 [--num-requests 256]

Needs as many GPUs as the largest size. Writes ops/bench/results/dp_throughput-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import anyio

from asyncllm.bench import model, results, workloads


async def _run(size: int, mdir: Path, reqs: list[workloads.Request]) -> dict[str, Any]:
    from asyncllm import EngineArgs, SamplingParams
    from asyncllm.engine.data_parallel import DataParallelEngine
    from asyncllm.sampling_params import RequestOutputKind

    args = EngineArgs(model=str(mdir), dtype="bfloat16")
    tokens = 0
    async with DataParallelEngine.from_engine_args(args, size) as dp:

        async def one(r: workloads.Request) -> None:
            nonlocal tokens
            sp = SamplingParams(
                max_tokens=r.max_tokens,
                ignore_eos=True,
                temperature=0.6,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            async for out in dp.generate({"prompt_token_ids": r.prompt_token_ids}, sp):
                tokens += len(out.outputs[0].token_ids)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for r in reqs:
                tg.start_soon(one, r)
        elapsed = time.perf_counter() - start
        routed = [s.routed for s in dp.engine_states()]
    return {"size": size, "elapsed_s": elapsed, "output_tokens": tokens, "routed": routed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench.dp_throughput")
    p.add_argument("--sizes", default="1,2", help="engine counts to run, comma-separated")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    mdir = model.build_model_dir(Path(a.model_dir) if a.model_dir else model.DEFAULT_DIR)
    reqs = workloads.throughput_workload(n=a.num_requests)
    runs = []
    for size in [int(s) for s in a.sizes.split(",")]:
        r = anyio.run(_run, size, mdir, reqs)
        r["tok_s"] = r["output_tokens"] / r["elapsed_s"]
        runs.append(r)
        print(f"{size} engine(s): {r['tok_s']:,.0f} output tok/s, routed {r['routed']}")
    base = runs[0]
    records = [
        results.record(
            "dp_throughput",
            r["tok_s"],
            "tok/s",
            f"DataParallelEngine size {base['size']}",
            base["tok_s"],
            None,
            **r,
        )
        for r in runs
    ]
    print("written:", results.write(records, "dp_throughput", Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
