"""Shaping an OpenAI answer's choices beyond their text: tool-call deltas of a chat with tools,
the echo / token-id extras of a request, and a stream primed with its first output."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from asyncllm.gateway.engine_io import Piece
from asyncllm.tools import ToolCallStream


@dataclass
class Shape:
    """What the answer's body needs to know besides the pieces."""

    n: int  # choices in all
    per_prompt: int  # the request's n
    prompt_tokens: int
    echo: list[str] | None  # per prompt: its text, put before its choices' text
    token_ids: list[list[int]] | None  # per prompt: its token ids (return_token_ids)

    def prompt_of(self, index: int) -> int:
        return index // self.per_prompt

    def extra(self, index: int, chat: bool, token_ids: list[int]) -> dict[str, Any]:
        """return_token_ids: a choice's generated ids (and a completion's prompt ids, as vLLM)."""
        if self.token_ids is None:
            return {}
        out: dict[str, Any] = {"token_ids": token_ids}
        if not chat:
            out["prompt_token_ids"] = self.token_ids[self.prompt_of(index)]
        return out


def tool_delta(ts: ToolCallStream, p: Piece) -> tuple[dict[str, Any], str | None]:
    """One piece of a chat choice with tools -> its delta (content and/or tool-call pieces)."""
    d = ts.feed(p.text)
    content, calls = d.content, list(d.tool_calls)
    finish = p.finish_reason
    if finish:
        end = ts.finish()
        content += end.content
        calls += end.tool_calls
        finish = ts.finish_reason(finish)
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    return delta, finish


async def primed(gen: AsyncIterator[list[Piece]]) -> AsyncIterator[list[Piece]]:
    """`gen` with its first item already taken (its errors raised here), then the rest."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[list[Piece]]:
        async with aclosing(gen):
            if first is not None:
                yield first
            async for item in gen:
                yield item

    return rest()
