"""One engine run of the `cpu` benchmark (asyncllm/bench/cpu.py) in a process of its own, so each
round starts from a fresh engine and no engine's threads, allocator or oneDNN caches outlive it.

python -m asyncllm.bench.cpu_worker asyncllm|transformers JOB_JSON OUT_JSON

JOB_JSON (the same shape llamacpp_worker.py reads):
  mode: "batch" (all prompts submitted at once; output tok/s) or "single" (one request at a time,
        each timed from submission to its last token: ms/token)
  prompts: [[ids]], warmup: [ids], max_tokens: int, threads: int
  engine_kw: EngineArgs fields for asyncllm (e.g. {"cpu_weights": "quantized"})
  model_dir: the converted float32 directory (transformers)
  logprob_prompts: k > 0: after the timed run, an untimed batch of the first k prompts that also
        returns each chosen token's logprob (quantized paths are compared by it)"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _asyncllm(job: dict[str, Any]) -> dict[str, Any]:
    from asyncllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(None, device="cpu", **job.get("engine_kw", {}))
    start = time.perf_counter() - t0
    n_max = job["max_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=n_max, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": job["warmup"]}],
        SamplingParams(temperature=0.0, max_tokens=4),
        use_tqdm=False,
    )
    out: dict[str, Any] = {"engine_start_s": start, "engine_kw": job.get("engine_kw", {})}
    prompts = job["prompts"]
    if job["mode"] == "batch":
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(len(t) for t in token_ids)
        out.update(elapsed_s=elapsed, output_tokens=n, output_tok_per_s=n / elapsed)
    else:
        token_ids, per_req = [], []
        for p in prompts:
            t0 = time.perf_counter()
            (o,) = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
            dt = time.perf_counter() - t0
            token_ids.append(list(o.outputs[0].token_ids))
            per_req.append(dt * 1e3 / max(1, len(token_ids[-1])))
        out.update(
            ms_per_token=statistics.median(per_req),
            per_request_ms_per_token=per_req,
            output_tokens=sum(len(t) for t in token_ids),
        )
    out["token_ids"] = token_ids
    k = job.get("logprob_prompts", 0)
    if k:
        lp = SamplingParams(temperature=0.0, max_tokens=n_max, ignore_eos=True, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:k]], lp, use_tqdm=False)
        out["logprob_pass"] = {
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [
                [
                    d[t].logprob
                    for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
                ]
                for o in outs
            ],
        }
    llm.shutdown()
    return out


def _transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from asyncllm.bench.hf_baseline import _generate, load_hf

    if job["mode"] != "batch":
        raise ValueError("transformers runs in batch mode only")
    t0 = time.perf_counter()
    model = load_hf(Path(job["model_dir"]), "cpu", torch.float32)
    start = time.perf_counter() - t0
    pad = model.config.pad_token_id or 0
    prompts, n_max = job["prompts"], job["max_tokens"]
    _generate(model, [prompts[0][:8]], 2, pad, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    # one padded batch of all prompts; EOS may be generated and does not stop a row, as the
    # engines' ignore_eos (min_new_tokens would instead forbid EOS and change the greedy path)
    ids = _generate(model, prompts, n_max, pad, ignore_eos=True)
    elapsed = time.perf_counter() - t0
    width = ids.shape[1] - n_max
    n = len(prompts) * n_max
    return {
        "elapsed_s": elapsed,
        "output_tokens": n,
        "output_tok_per_s": n / elapsed,
        "engine_start_s": start,
        "batch_size": len(prompts),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "token_ids": ids[:, width:].tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    engine, job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    run = {"asyncllm": _asyncllm, "transformers": _transformers}[engine]
    out = run(job)
    out["torch"] = torch.__version__
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
