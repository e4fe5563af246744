"""A small chat bot on asyncllm.client: answers each line from stdin, keeping the conversation.

    asyncllm serve &                     # or any asyncllm gateway
    python examples/bot.py --url ws://127.0.0.1:8000/v1/ws --api-key KEY
    printf 'Hi\\nTell me a joke\\n' | python examples/bot.py

Needs only `pip install asyncllm[client]`. A dropped connection is survived transparently
(reconnect + resume); a reply that cannot be finished is reported and the bot goes on.
"""

from __future__ import annotations

import argparse
import sys

import anyio

from asyncllm import envs
from asyncllm.client import AsyncLLMClientError, Client, StreamLost


async def bot(args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    stdin = anyio.wrap_file(sys.stdin)
    async with Client(args.url, api_key=args.api_key) as client:
        async for line in stdin:
            line = line.strip()
            if not line:
                continue
            history.append({"role": "user", "content": line})
            context = history
            if args.history and len(history) > args.history:  # the system prompt stays
                context = history[: 1 if args.system else 0] + history[-args.history :]
            stream = client.chat(
                context,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
            )
            print(args.prefix, end="", flush=True)
            try:
                async for delta in stream:
                    print(delta.text, end="", flush=True)
                reply = stream.received_text()
            except StreamLost as e:
                print(f"\n[reply lost: {e}]", file=sys.stderr)
                reply = e.text
            except AsyncLLMClientError as e:
                print(f"\n[error: {e}]", file=sys.stderr)
                history.pop()
                print()
                continue
            print()
            history.append({"role": "assistant", "content": reply})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=envs.url())
    p.add_argument("--api-key", default=envs.api_key())
    p.add_argument("--system", default="You are a helpful assistant. Answer briefly.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--history", type=int, default=20, help="messages kept as context (0 = all)")
    p.add_argument("--prefix", default="bot> ")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = p.parse_args(argv)
    try:
        return anyio.run(bot, args, backend=args.backend)
    except KeyboardInterrupt:
        return 130
    except AsyncLLMClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
