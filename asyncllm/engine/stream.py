"""Per-request coalescing stream: the event-loop side of one request's outputs.

The engine thread never waits for a reader. When a consumer is slow, outputs that arrive before it
reads are merged into the one pending output (`merge_outputs`), so a stream holds at most one
output however far behind its reader is, and memory stays bounded by the request's own length.

Everything here runs on the event loop's thread: the engine thread hands outputs over through
`AsyncLLMEngine`'s outbox, whose callback calls `put` / `put_error` on the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import anyio

from asyncllm.outputs import CompletionOutput, RequestOutput
from asyncllm.sampling_params import RequestOutputKind


def _merge_completion(
    old: CompletionOutput, new: CompletionOutput, kind: RequestOutputKind
) -> CompletionOutput:
    if kind is not RequestOutputKind.DELTA:
        return new  # CUMULATIVE / FINAL_ONLY: the newest holds everything so far
    if old.logprobs is None:
        logprobs = new.logprobs
    elif new.logprobs is None:
        logprobs = old.logprobs
    else:
        logprobs = old.logprobs + new.logprobs
    return CompletionOutput(
        index=new.index,
        text=old.text + new.text,
        token_ids=old.token_ids + new.token_ids,
        # The engine reports the running total, not a delta: the newest is the right one.
        cumulative_logprob=new.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=new.finish_reason or old.finish_reason,
        stop_reason=new.stop_reason if new.finish_reason else old.stop_reason,
    )


def merge_outputs(old: RequestOutput, new: RequestOutput, kind: RequestOutputKind) -> RequestOutput:
    """One output that says what `old` followed by `new` said.

    DELTA concatenates text, token ids and logprobs per output index; CUMULATIVE and FINAL_ONLY
    keep the newest per index. Indexes present in only one of the two are kept as they are, so the
    sequences of an n>1 request never mix.
    """
    by_index = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = by_index.get(c.index)
        by_index[c.index] = c if prev is None else _merge_completion(prev, c, kind)
    prompt_logprobs = new.prompt_logprobs
    if prompt_logprobs is None:
        # DELTA sends prompt logprobs once, on the first output; do not lose them when merging.
        prompt_logprobs = old.prompt_logprobs
    return dataclasses.replace(
        new,
        outputs=[by_index[i] for i in sorted(by_index)],
        prompt_logprobs=prompt_logprobs,
        finished=old.finished or new.finished,
    )


class RequestStream:
    """Outputs of one request on their way to one consumer (`async for` in `generate`).

    Holds at most one pending output (later ones merge into it) and, at the end, either a finished
    output or an exception. Not thread-safe by design: only the event loop touches it.

    With a `sink`, outputs are not queued for the reader: each is handed to `sink(output)` as it
    arrives (on the loop, inside the engine's drain), and the reader only waits for the end. That
    saves a task switch per output per request, which on a GPU is loop time taken from the
    engine thread. An exception from the sink ends the reader with it (which aborts the request).
    """

    def __init__(
        self,
        request_id: str,
        output_kind: RequestOutputKind,
        sink: Callable[[RequestOutput], None] | None = None,
    ):
        self.request_id = request_id
        self.output_kind = output_kind
        self.sink = sink
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._wakeup: anyio.Event | None = None  # the reader waits on it
        # The running backend's own Event class, found once: anyio.Event() looks the backend up
        # on every call, and a reader makes one event per output.
        self._event_cls: type[anyio.Event] | None = None
        self._finished_event: anyio.Event | None = None  # abort() waits on it
        self.finished = False  # the engine has said its last word (finished output or error)
        self.detached = False  # the reader left: keep nothing, only track the end
        self.num_puts = 0  # outputs handed in by the engine
        self.num_merges = 0  # of which merged into a pending one (the reader was behind)

    # ---- producer side (the event loop, on behalf of the engine thread) ---------------------
    def put(self, output: RequestOutput) -> None:
        if self.finished:
            return
        self.num_puts += 1
        if self.detached:
            pass  # nobody will read it
        elif self.sink is not None:
            try:
                self.sink(output)
            except Exception as e:
                # The reader raises it and leaves, which aborts the request; later outputs
                # (up to the abort's final one) go nowhere.
                self.detached = True
                self._error = e
        elif self._pending is None:
            self._pending = output
        else:
            self._pending = merge_outputs(self._pending, output, self.output_kind)
            self.num_merges += 1
        if output.finished:
            self._finish()
        if self._pending is not None or self._error is not None or self.finished:
            self._wake()  # (a sink's reader has nothing to do until the end)

    def put_error(self, error: BaseException) -> None:
        """End the stream with `error`, raised to the reader after any pending output."""
        if self.finished:
            return
        self._error = error
        self._finish()
        self._wake()

    def _finish(self) -> None:
        self.finished = True
        if self._finished_event is not None:
            self._finished_event.set()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def wait_finished(self) -> None:
        """Until the engine has said its last word on this request."""
        if not self.finished:
            if self._finished_event is None:
                self._finished_event = anyio.Event()
            await self._finished_event.wait()

    # ---- consumer side ----------------------------------------------------------------------
    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    async def get(self) -> RequestOutput:
        """The next (possibly merged) output; StopAsyncIteration after the finished one."""
        while True:
            if self._pending is not None:
                out, self._pending = self._pending, None
                return out
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self.finished:
                raise StopAsyncIteration
            if self._event_cls is None:
                self._event_cls = type(anyio.Event())
            self._wakeup = self._event_cls()
            await self._wakeup.wait()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        return await self.get()
