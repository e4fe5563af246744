"""Stream a chat answer from the default model (SmolLM2-135M-Instruct) to the terminal.

    python examples/app_stream.py "Why is the sky blue?"
    python examples/app_stream.py --trio --max-tokens 64 "Write a haiku about the sea."

Ctrl-C stops the answer: leaving the `async for` aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from asyncllm import AsyncLLMEngine, EngineArgs, SamplingParams
from asyncllm.sampling_params import RequestOutputKind


async def main(question: str, max_tokens: int, model: str | None) -> None:
    print(f"loading {model or 'the default model'} ...", file=sys.stderr)
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=model))
    async with engine:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.7,
            top_p=0.9,
            seed=0,
            output_kind=RequestOutputKind.DELTA,  # each output holds only the new text
        )
        messages = [{"role": "user", "content": question}]
        start = time.monotonic()
        first = None
        n_tokens = 0
        async for out in engine.chat(messages, params):
            piece = out.outputs[0]
            if first is None:
                first = time.monotonic() - start
            n_tokens += len(piece.token_ids)
            print(piece.text, end="", flush=True)
            if out.finished:
                elapsed = time.monotonic() - start
                print(
                    f"\n[{piece.finish_reason}; {n_tokens} tokens; first token after "
                    f"{first:.2f}s; {n_tokens / elapsed:.1f} tok/s]",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("question", nargs="?", default="What is the capital of France? Answer briefly.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default=None, help="HF dir or .gguf file (default: SmolLM2-135M)")
    ap.add_argument("--trio", action="store_true", help="run under trio instead of asyncio")
    a = ap.parse_args()
    try:
        anyio.run(main, a.question, a.max_tokens, a.model, backend="trio" if a.trio else "asyncio")
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
