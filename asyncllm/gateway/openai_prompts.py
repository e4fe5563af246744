"""What /v1/completions takes besides one plain prompt: a list of prompts (one request each, their
choices numbered prompt by prompt), `suffix` (fill-in-the-middle through the model's FIM tokens),
and `echo`; plus the merge of several requests' pieces into one stream of choices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import anyio

from asyncllm.gateway.engine_io import Piece
from asyncllm.gateway.limits import GatewayError
from asyncllm.protocol import INVALID_REQUEST, TOO_LARGE, parse_prompt

MAX_PROMPTS = 64  # prompts in one completions request

# (prefix, suffix, middle) token spellings of the common FIM vocabularies
_FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)


def completion_prompts(raw: Any) -> list[str | list[int]]:
    """A prompt, a list of token ids, a list of prompts or a list of token-id lists."""
    if isinstance(raw, list) and raw and isinstance(raw[0], (str, list)):
        if len(raw) > MAX_PROMPTS:
            raise GatewayError(TOO_LARGE, f"at most {MAX_PROMPTS} prompts per request")
        return [parse_prompt(p) for p in raw]
    return [parse_prompt(raw)]


def fim_tokens(tokenizer: Any) -> tuple[str, str, str] | None:
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return None
    for names in _FIM_TOKENS:
        if all(t in vocab for t in names):
            return names
    return None


def with_suffix(tokenizer: Any, prompts: list[str | list[int]], suffix: Any) -> list[str]:
    """Fill-in-the-middle prompts: prefix token, prompt, suffix token, suffix, middle token."""
    if not isinstance(suffix, str):
        raise GatewayError(INVALID_REQUEST, "suffix must be a string")
    fim = fim_tokens(tokenizer)
    if fim is None:
        raise GatewayError(
            INVALID_REQUEST, "suffix needs a model with fill-in-the-middle tokens; this has none"
        )
    if not all(isinstance(p, str) for p in prompts):
        raise GatewayError(INVALID_REQUEST, "suffix needs text prompts, not token ids")
    pre, suf, mid = fim
    return [f"{pre}{p}{suf}{suffix}{mid}" for p in prompts]  # type: ignore[str-bytes-safe]


def echo_text(tokenizer: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


async def merge_pieces(
    gens: list[AsyncIterator[list[Piece]]], n: int
) -> AsyncIterator[list[Piece]]:
    """The pieces of several requests as they come, choice k of request i renumbered i*n + k.
    Closing this closes (aborts) every request; one failing fails the whole."""
    send, recv = anyio.create_memory_object_stream[list[Piece]](len(gens) * 4)

    async def pump(i: int, gen: AsyncIterator[list[Piece]]) -> None:
        async with aclosing(gen):  # type: ignore[type-var]
            async for pieces in gen:
                await send.send([replace(p, index=p.index + i * n) for p in pieces])

    async def run_all() -> None:
        async with send, anyio.create_task_group() as tg:
            for i, g in enumerate(gens):
                tg.start_soon(pump, i, g)

    async with anyio.create_task_group() as tg:
        failure: list[BaseException] = []

        async def runner() -> None:
            try:
                await run_all()
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as e:  # re-raised in the consumer, below
                failure.append(e)
                await send.aclose()

        tg.start_soon(runner)
        try:
            async with recv:
                async for pieces in recv:
                    yield pieces
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise _first_leaf(failure[0])


def _first_leaf(e: BaseException) -> BaseException:
    while isinstance(getattr(e, "exceptions", None), tuple) and e.exceptions:  # a group
        e = e.exceptions[0]
    return e
