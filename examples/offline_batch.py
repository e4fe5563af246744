"""Offline batch generation with `LLM`: many prompts in, one RequestOutput per prompt out.

    python examples/offline_batch.py                      # the default model, built-in prompts
    python examples/offline_batch.py --chat prompts.txt   # one question per line, chat template
    python examples/offline_batch.py --model path/to/hf_dir --max-tokens 64

The engine batches every prompt continuously (paged KV cache, chunked prefill); a progress bar
shows on batches of more than one prompt. Outputs come back in the order of the prompts.
"""

from __future__ import annotations

import argparse
import sys
import time

from asyncllm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The three primary colours are",
    "def fibonacci(n):",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("prompts", nargs="?", default=None, help="a file: one prompt per line")
    ap.add_argument("--chat", action="store_true", help="each line is a user message")
    ap.add_argument("--model", default=None, help="HF dir or .gguf file (default: SmolLM2-135M)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    a = ap.parse_args(argv)

    if a.prompts:
        with open(a.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = PROMPTS
    llm = LLM(model=a.model)
    params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, seed=0)
    start = time.monotonic()
    if a.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    elapsed = time.monotonic() - start
    for prompt, out in zip(prompts, outs, strict=True):
        c = out.outputs[0]
        print(f"--- {prompt!r} [{c.finish_reason}, {len(c.token_ids)} tokens]")
        print(c.text)
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"[{len(outs)} prompts, {total} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
