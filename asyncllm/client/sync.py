"""SyncClient: the Client for scripts without an event loop. The async Client runs on an asyncio
loop in a helper thread (anyio's blocking portal); every call here blocks on it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from asyncllm.client.client import Client
from asyncllm.client.stream import ChatStream, Delta, Usage


class SyncStream:
    """A ChatStream seen from a plain thread: iterate for Deltas, or call text()."""

    def __init__(self, portal: BlockingPortal, stream: ChatStream):
        self._portal = portal
        self._stream = stream

    @property
    def id(self) -> int | str:
        return self._stream.id

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._stream.usage

    def __iter__(self) -> Iterator[Delta]:
        it = self._portal.call(lambda: self._stream.__aiter__())

        async def anext() -> Delta:
            return await it.__anext__()

        try:
            while True:
                try:
                    yield self._portal.call(anext)
                except StopAsyncIteration:
                    return
        finally:
            if not self._stream.done:
                self._portal.call(self._stream.cancel)

    def text(self, index: int = 0) -> str:
        return self._portal.call(self._stream.text, index)

    def tool_calls(self, index: int = 0) -> list[dict[str, Any]]:
        return self._portal.call(self._stream.tool_calls, index)

    def texts(self) -> list[str]:
        return self._portal.call(self._stream.texts)

    def cancel(self) -> None:
        self._portal.call(self._stream.cancel)


class SyncClient:
    """`Client` with blocking calls:

        with SyncClient("ws://127.0.0.1:8000/v1/ws") as client:
            print(client.chat([{"role": "user", "content": "Hi"}], max_tokens=32).text())

    Takes the same arguments as `Client`.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/ws", api_key: str | None = None, **kw):
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._client = Client(url, api_key, **kw)
            # one task enters and exits the client (its task group must stay in one task)
            self._client_cm = self._portal.wrap_async_context_manager(self._client)
            self._client_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

    @property
    def client(self) -> Client:
        return self._client

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> SyncStream:
        s = self._portal.call(lambda: self._client.chat(messages, **params))
        return SyncStream(self._portal, s)

    def complete(self, prompt: str | list[int], **params: Any) -> SyncStream:
        s = self._portal.call(lambda: self._client.complete(prompt, **params))
        return SyncStream(self._portal, s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
