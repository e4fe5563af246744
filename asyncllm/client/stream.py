"""One chat (or completion) stream on the client side: assembles deltas in seq order, drops
replays it has already delivered, and turns a gap into an error instead of silently losing text."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from asyncllm.client.errors import AsyncLLMClientError, StreamLost, error_from_frame
from asyncllm.protocol import INTERNAL

StreamId = int | str


@dataclass
class Delta:
    """New text of one choice. `seq` counts from 1 per stream (across choices)."""

    text: str
    seq: int
    index: int = 0
    token_ids: list[int] | None = None
    logprobs: list[dict[str, Any]] | None = None
    stream_id: StreamId | None = None
    # Pieces of tool calls, in OpenAI's streamed shape: {"index", "id", "type", "function":
    # {"name", "arguments": ""}} opens call `index`, then {"index", "function": {"arguments"}}
    # adds to its arguments. `ChatStream.tool_calls()` assembles them.
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Choice:
    chunks: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # assembled tool calls

    def add_tool_calls(self, pieces: list[dict[str, Any]]) -> None:
        for p in pieces:
            k = p.get("index", 0)
            call = self.calls.setdefault(
                k, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if p.get("id"):
                call["id"] = p["id"]
            fn = p.get("function") or {}
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
            call["function"]["arguments"] += fn.get("arguments") or ""

    def text(self) -> str:
        if len(self.chunks) > 1:  # join once, keep it joined
            self.chunks[:] = ["".join(self.chunks)]
        return self.chunks[0] if self.chunks else ""


class ChatStream:
    """What `Client.chat()` / `Client.complete()` return. Iterate it for `Delta`s, or await
    `text()` for the whole reply; `finish_reason` and `usage` are set once it is done.

    Leaving an `async for` early, or an `async with` block, cancels the stream on the server.
    """

    def __init__(
        self,
        stream_id: StreamId,
        request: dict[str, Any],
        n: int,
        on_cancel: Callable[[ChatStream], None],
    ):
        self.id = stream_id
        self.request = request  # the chat/complete frame, re-sent when the server never got it
        self.n = n
        self.finish_reason: str | None = None
        self.finish_reasons: list[str] | None = None
        self.usage: Usage | None = None
        # client bookkeeping
        self.last_seq = 0
        self.done_seq: int | None = None  # the seq of the `done` frame, once it came
        self.submitted = False  # a frame starting it went to a socket of the current session
        self.resuming = False  # a resume frame is out; no frame has come back yet
        self._on_cancel = on_cancel
        self._choices = [_Choice() for _ in range(n)]
        self._queue: deque[Delta] = deque()
        self._collect_only = False  # text() was called: no one reads the queue
        self._done = False
        self._error: BaseException | None = None
        self._wakeup = anyio.Event()
        self._iterating = False

    # ---- state seen by users ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    def received_text(self, index: int = 0) -> str:
        """Text of choice `index` received so far (the whole text once done)."""
        return self._choices[index].text()

    # ---- fed by the client ------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = anyio.Event()

    def feed_delta(self, frame: dict[str, Any]) -> None:
        """Deliver a delta frame exactly once: a seq seen before is a replay and is dropped; a seq
        past the next one means frames were lost, which must not pass silently."""
        if self._done:
            return
        seq = frame["seq"]
        self.resuming = False
        if not isinstance(seq, int) or seq <= self.last_seq:
            return
        if seq != self.last_seq + 1:
            self.fail(
                StreamLost(
                    f"stream {self.id!r}: deltas {self.last_seq + 1}..{seq - 1} never arrived",
                    self.received_text(),
                    self.id,
                )
            )
            return
        index = frame.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < self.n:
            self.fail(StreamLost(f"stream {self.id!r}: bad choice index {index!r}", "", self.id))
            return
        self.last_seq = seq
        text = frame["text"]
        self._choices[index].chunks.append(text)
        calls = frame.get("tool_calls")
        if isinstance(calls, list):
            self._choices[index].add_tool_calls(calls)
        if not self._collect_only:
            self._queue.append(
                Delta(
                    text,
                    seq,
                    index,
                    frame.get("token_ids"),
                    frame.get("logprobs"),
                    self.id,
                    calls if isinstance(calls, list) else None,
                )
            )
        self._wake()

    def feed_done(self, frame: dict[str, Any]) -> None:
        if self._done:
            return
        seq = frame["seq"]
        self.resuming = False
        if not isinstance(seq, int) or seq <= self.last_seq:
            return  # a stale replay; cannot be the end
        # `done` takes the seq after the last delta; a larger one means deltas went missing
        if seq > self.last_seq + 1:
            self.fail(
                StreamLost(
                    f"stream {self.id!r}: deltas {self.last_seq + 1}..{seq - 1} never arrived",
                    self.received_text(),
                    self.id,
                )
            )
            return
        self.done_seq = seq
        self.finish_reason = frame.get("finish_reason")
        self.finish_reasons = frame.get("finish_reasons")
        u = frame.get("usage") or {}
        self.usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
        if self.finish_reason == "error":
            # the request failed on the server (its error frame may have been lost in a drop;
            # the done carries the same error)
            err = frame.get("error") or {}
            self.fail(
                error_from_frame(
                    {
                        "id": self.id,
                        "code": err.get("code", INTERNAL),
                        "message": err.get("message", "the request failed on the server"),
                    }
                )
            )
            return
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._done:
            return
        if isinstance(error, AsyncLLMClientError) and not error.text:
            error.text = self.received_text()
        self._error = error
        self._done = True
        self._wake()

    def finish_cancelled(self) -> None:
        if self._done:
            return
        self.finish_reason = "cancelled"
        self._queue.clear()
        self._done = True
        self._wake()

    # ---- consumed by users --------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Delta]:
        if self._iterating:
            raise RuntimeError(f"stream {self.id!r} is already being iterated")
        self._iterating = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        # An async generator so that leaving `async for` early (break, exception, cancellation)
        # reaches `finally` and cancels the stream on the server.
        try:
            while True:
                d = await self._next()
                if d is None:
                    return
                yield d
        finally:
            if not self._done:
                self._on_cancel(self)

    async def _next(self) -> Delta | None:
        while not self._queue:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            await self._wakeup.wait()
        return self._queue.popleft()

    async def wait(self) -> None:
        """Wait until the stream is done; raise its error, if it failed."""
        self._collect_only = True
        self._queue.clear()
        while not self._done:
            await self._wakeup.wait()
        if self._error is not None:
            raise self._error

    async def text(self, index: int = 0) -> str:
        """The whole text of choice `index` (waits for the end; raises the stream's error)."""
        if not 0 <= index < self.n:
            raise ValueError(f"index must be in [0, {self.n}), got {index}")
        await self.wait()
        return self.received_text(index)

    def received_tool_calls(self, index: int = 0) -> list[dict[str, Any]]:
        """Tool calls of choice `index` assembled so far, in OpenAI's message shape."""
        calls = self._choices[index].calls
        return [calls[k] for k in sorted(calls)]

    async def tool_calls(self, index: int = 0) -> list[dict[str, Any]]:
        """The tool calls of choice `index` (waits for the end; raises the stream's error):
        [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]."""
        if not 0 <= index < self.n:
            raise ValueError(f"index must be in [0, {self.n}), got {index}")
        await self.wait()
        return self.received_tool_calls(index)

    async def texts(self) -> list[str]:
        """The whole text of every choice (n > 1)."""
        await self.wait()
        return [c.text() for c in self._choices]

    async def cancel(self) -> None:
        """Stop the stream here and on the server. Deltas not yet read are dropped; idempotent."""
        if not self._done:
            self._on_cancel(self)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()

    def __repr__(self) -> str:
        state = "done" if self._done else "open"
        return f"<ChatStream {self.id!r} {state} seq={self.last_seq}>"
