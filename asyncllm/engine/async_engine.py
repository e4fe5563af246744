"""AsyncLLMEngine: the sync LLMEngine driven by one thread, streamed to asyncio or trio.

One engine thread owns every piece of engine state (LLMEngine, its tokenizer, scheduler, KV
cache) and needs no locks on it. Two crossings only:

- the inbox (a thread-safe queue): add, abort and shutdown commands from the event loop; the thread
  blocks on it when it has nothing to compute;
- the outbox: after each step the thread merges the step's outputs into a dict keyed by request
  and, unless a drain is already scheduled, makes one call into the event loop
  (asyncio's `loop.call_soon_threadsafe` / trio's `TrioToken.run_sync_soon`). The drain hands each
  output to its request's `RequestStream`, which coalesces when its reader is behind.

So outputs cross once per step for all requests, the thread never waits for a reader, and a slow
reader (or a starved loop) costs at most one pending output per request.

Where the engine loop (engine_loop.py) runs is the transport's business (transports.py): a
`ThreadTransport` runs it in the engine thread; with `EngineArgs.engine_process` a
`ProcessTransport` runs it in a child process (engine_process.py), so that no engine work shares
this process's GIL with the event loop, and two threads here forward the inbox down a pipe and
post what comes up it to the outbox. This class is the same either way.

AsyncLLMEngine implements `EngineClient` (engine_client.py), the contract the gateway is written
against.

Every registered stream gets exactly one terminal event from the thread: its finished output (which
an abort also produces), its add error (bad input -> ValueError), or the engine's death
(EngineDeadError). A stream stays registered until then, so a request id stays "live", and cannot be
reused, until the engine has really let go of the request.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import sniffio

from asyncllm.config import EngineArgs
from asyncllm.engine.engine_loop import Abort as _Abort
from asyncllm.engine.engine_loop import Add as _Add
from asyncllm.engine.engine_loop import Item, merge_items
from asyncllm.engine.stream import RequestStream
from asyncllm.engine.transports import EngineInfo, ProcessTransport, ThreadTransport, Transport
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import RequestOutputKind, SamplingParams, default_sampling_params

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (a fatal error in a step, or shutdown): no more outputs."""


class RequestIterator(AsyncIterator[RequestOutput]):
    """What `generate()` returns: an async iterator over one request's outputs.

    Ending it early in any way aborts the request in the engine: `break` (the iterator is dropped),
    `aclose()` (e.g. `contextlib.aclosing`), or a cancellation while it waits for the next output.
    """

    def __init__(self, engine: AsyncLLMEngine, stream: RequestStream):
        self._engine = engine
        self._stream = stream
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> RequestIterator:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return await self._stream.get()
        except StopAsyncIteration:
            self._closed = True
            raise
        except BaseException:
            # Cancelled while waiting, or the stream's terminal error: either way we are done.
            self._close()
            raise

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._detach(self._stream)

    def __del__(self) -> None:
        # `break` out of `async for` drops the iterator at once (CPython refcounting); _detach only
        # flags the stream and puts on the thread-safe inbox, so it is safe from any thread.
        try:
            self._close()
        except Exception:  # interpreter shutdown: nothing left to tell
            pass


class AsyncLLMEngine:
    """`async with AsyncLLMEngine.from_engine_args(EngineArgs(...)) as engine:` starts the engine
    thread (loading the model in a worker thread); leaving the block shuts it down."""

    def __init__(
        self,
        engine: Any = None,
        engine_args: EngineArgs | None = None,
        engine_factory: Callable[[EngineArgs], Any] | None = None,
    ):
        """`engine`: an LLMEngine already loaded (run in the engine thread). `engine_args`: what to
        load at start(): in the engine thread, or with `engine_args.engine_process` in a child
        process. `engine_factory` (with engine_process): what builds the engine in the child from
        the EngineArgs; a picklable top-level callable. Default: LLMEngine.from_engine_args."""
        if engine is None and engine_args is None:
            raise ValueError("pass an LLMEngine or EngineArgs")
        self.engine_args = engine_args
        self._transport: Transport
        if engine is None and engine_args is not None and engine_args.engine_process:
            self._transport = ProcessTransport(engine_args, engine_factory)
        else:
            self._transport = ThreadTransport(engine, engine_args)
        self._streams: dict[str, RequestStream] = {}
        self._outbox: dict[str, Item] = {}
        self._outbox_dead: EngineDeadError | None = None
        self._outbox_lock = threading.Lock()  # guards the crossing, never engine state
        self._drain_scheduled = False
        # Live requests' output kinds, for merging in the outbox: written on the loop (submit,
        # drain), read by the thread that posts.
        self._kinds: dict[str, RequestOutputKind] = {}
        self._call_in_loop: Callable[[Callable[[], None]], None] | None = None
        self._stats: Any = None  # EngineStats snapshot, replaced by the transport after each step
        self._dead: EngineDeadError | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._start_lock: anyio.Lock | None = None
        self._shutdown_done: anyio.Event | None = None
        self.tokenizer: Any = None
        self.model_config: Any = None
        self.vocab_size: int | None = None
        info = self._transport.info()
        if info is not None:
            self._adopt(info)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        """Nothing is loaded here: `start()` (or `async with`) loads the model off the loop."""
        if not isinstance(args, EngineArgs):
            raise ValueError(f"expected EngineArgs, got {type(args).__name__}")
        return cls(engine_args=args)

    def _adopt(self, info: EngineInfo) -> None:
        self.tokenizer = info.tokenizer
        self.model_config = info.model_config
        self.vocab_size = info.vocab_size
        self._stats = info.stats

    # ---- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncLLMEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Load the model (in a worker thread) and start the engine loop. Idempotent."""
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if self._closing or self._closed:
                raise RuntimeError("this engine was shut down; build a new one")
            if self._started:
                return
            self._call_in_loop = _loop_caller()
            self._adopt(await self._transport.start(self._post_step, self._die))
            self._started = True

    async def shutdown(self) -> None:
        """Abort every open request (their streams end with finish_reason "abort"), stop and join
        the engine loop, and drop the model and KV cache. Idempotent; safe after a fatal error."""
        if self._closed:
            return
        if self._closing:
            assert self._shutdown_done is not None
            await self._shutdown_done.wait()
            return
        self._closing = True
        self._shutdown_done = anyio.Event()
        # Cleanup must run to the end even when the caller is being cancelled.
        with anyio.CancelScope(shield=True):
            await self._transport.stop()
            self._drain_outbox()
            gone = EngineDeadError("the engine was shut down")
            for stream in list(self._streams.values()):
                stream.put_error(gone)
            self._streams.clear()
            self._transport.release()  # frees the model and the KV cache
            self._closed = True
            self._shutdown_done.set()

    @property
    def errored(self) -> bool:
        """True once a fatal error killed the engine thread."""
        return self._dead is not None

    @property
    def is_running(self) -> bool:
        return self._started and not self._closing and not self._closed and self._dead is None

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine thread died."""
        if self._dead is not None:
            raise self._dead

    @property
    def num_unfinished_requests(self) -> int:
        """Requests the engine has not let go of yet (aborted ones count until it confirms)."""
        return len(self._streams)

    def stats(self) -> Any:
        """EngineStats as of the engine thread's last step (a snapshot: no lock, no wait)."""
        if self._stats is None:
            raise RuntimeError("the engine is not loaded yet: call start() first")
        return self._stats

    # ---- requests -------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> RequestIterator:
        """Start a request; iterate the result for its RequestOutputs (each per the params'
        output_kind). Bad input (prompt too long, token ids outside the vocabulary, ...) raises
        ValueError from the first iteration; a duplicate live request id raises ValueError here.

        `sink`: for servers multiplexing many streams. Each output is passed to `sink(output)`
        on the event loop as soon as it arrives, instead of being yielded: the iteration yields
        nothing and ends when the request does (leaving it early still aborts). The sink must be
        quick and must not block; if it raises, the iteration raises that error."""
        add = _Add("", prompt, self._params(sampling_params), priority)
        return self._submit(add, request_id, sink)

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> RequestIterator:
        """`generate` for a conversation, rendered with the model's chat template."""
        add = _Add("", None, self._params(sampling_params), priority, messages=messages)
        return self._submit(add, request_id, sink)

    async def abort(self, request_id: str) -> None:
        """End a request and wait until the engine has freed it. Unknown or finished ids are a
        no-op. A reader still listening gets a last output with finish_reason "abort"."""
        stream = self._streams.get(request_id)
        if stream is None or stream.finished:
            return
        if self._dead is None and not self._closed:
            self._transport.send(_Abort(request_id))
        await stream.wait_finished()

    def _params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            # the model's generation_config.json defaults, once the engine has loaded it
            defaults = getattr(self.model_config, "generation_defaults", None)
            return default_sampling_params(defaults or {})
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}"
            )
        # The engine thread reads it later: the caller may reuse and change its object meanwhile.
        return sampling_params.clone()

    def _submit(
        self,
        add: _Add,
        request_id: str | None,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> RequestIterator:
        if self._dead is not None:
            raise EngineDeadError("the engine died; no new requests") from self._dead
        if self._closing or self._closed:
            raise EngineDeadError("the engine was shut down; no new requests")
        if not self._started:
            raise RuntimeError("the engine is not started: use `async with engine:` or start()")
        if not isinstance(add.priority, int) or isinstance(add.priority, bool):
            raise ValueError(f"priority must be an integer, got {add.priority!r}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use by a live request")
        add.request_id = request_id
        stream = RequestStream(request_id, add.params.output_kind, sink)
        self._streams[request_id] = stream
        self._kinds[request_id] = add.params.output_kind
        self._transport.send(add)
        return RequestIterator(self, stream)

    def _detach(self, stream: RequestStream) -> None:
        """The reader left: stop buffering for it and end the request if it is still running.
        Called from the loop or from a garbage collector: touches only the stream's flag and the
        thread-safe inbox."""
        stream.detached = True
        if not stream.finished and self._dead is None and not self._closed:
            self._transport.send(_Abort(stream.request_id))

    # ---- the loop side of the outbox ------------------------------------------------------------
    def _drain_outbox(self) -> None:
        """Runs on the event loop: hand everything the thread posted to the streams."""
        with self._outbox_lock:
            items, self._outbox = self._outbox, {}
            dead = self._outbox_dead
            self._drain_scheduled = False
        try:
            for rid, item in items.items():
                stream = self._streams.get(rid)
                if stream is None:
                    continue
                if isinstance(item, BaseException):
                    stream.put_error(item)
                else:
                    stream.put(item)
                if stream.finished:
                    del self._streams[rid]
                    self._kinds.pop(rid, None)
            if dead is not None:
                self._dead = dead
                for stream in self._streams.values():
                    stream.put_error(dead)
                self._streams.clear()
                self._kinds.clear()
        except Exception:  # never let a bug here take the event loop down with it
            logger.exception("asyncllm: failed to deliver engine outputs")

    # ---- the transport's side of the outbox (its thread) -----------------------------------------
    def _post_step(self, items: dict[str, Item], stats: Any) -> bool:
        self._stats = stats
        return self._post(items)

    def _post(self, items: dict[str, Item], dead: EngineDeadError | None = None) -> bool:
        """Hand a step's outputs to the loop: merge into the outbox, schedule at most one drain.
        Returns False when the loop is gone (nobody to deliver to)."""
        if not items and dead is None:
            return True
        with self._outbox_lock:
            merge_items(self._outbox, items, self._kinds)
            if dead is not None:
                self._outbox_dead = dead
            if self._drain_scheduled:
                return True
            self._drain_scheduled = True
        try:
            assert self._call_in_loop is not None
            self._call_in_loop(self._drain_outbox)
        except Exception:  # the event loop is closed: nobody is listening any more
            return False
        return True

    def _die(self, message: str, cause: BaseException | None = None) -> None:
        dead = EngineDeadError(message)
        dead.__cause__ = cause
        self._dead = dead  # new requests fail at once, even before the loop hears of it
        self._post({}, dead)


def _loop_caller() -> Callable[[Callable[[], None]], None]:
    """The thread-safe 'run this callback on the current event loop' of the running library."""
    lib = sniffio.current_async_library()
    if lib == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    if lib == "asyncio":
        import asyncio

        return asyncio.get_running_loop().call_soon_threadsafe
    raise RuntimeError(f"AsyncLLMEngine runs under asyncio or trio, not {lib}")
