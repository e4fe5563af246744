"""The two ways AsyncLLMEngine reaches its engine loop, behind one interface (`Transport`).

- `ThreadTransport`: the engine loop (engine_loop.py) in a thread of this process, reading the
  inbox directly.
- `ProcessTransport`: the engine loop in a child process (engine_process.py); a sender thread
  forwards the inbox down the pipe, a receiver thread hands what comes up to the owner.

Either way the owner (AsyncLLMEngine) sees the same two crossings: it `send`s commands (from any
thread), and the transport calls `post(items, stats)` once per step (False: nobody is listening
any more, stop) and `die(message, cause)` once if the loop dies. The owner's outbox, streams and
request bookkeeping do not know which transport runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from asyncllm.config import EngineArgs
from asyncllm.engine.engine_loop import (
    AdmitWindow,
    Command,
    Fail,
    Item,
    Shutdown,
    run_engine_loop,
    watch_engine,
)
from asyncllm.profiling import profiled

logger = logging.getLogger(__name__)

DEAD_THREAD_JOIN_S = 30.0

Post = Callable[[dict[str, Item], Any], bool]
Die = Callable[[str, "BaseException | None"], None]


@dataclass
class EngineInfo:
    """What the owner learns once the engine is loaded."""

    tokenizer: Any
    model_config: Any  # ModelConfig
    vocab_size: int | None
    stats: Any  # EngineStats


class Transport(Protocol):
    def info(self) -> EngineInfo | None:
        """Known before start() when the engine was already loaded; else None."""
        ...

    async def start(self, post: Post, die: Die) -> EngineInfo:
        """Load the engine (off the event loop) and start the loop."""
        ...

    def send(self, cmd: Command) -> None:
        """Queue a command for the loop; thread-safe, never blocks."""
        ...

    async def stop(self) -> None:
        """Shut the loop down and wait for it (also after it died)."""
        ...

    def release(self) -> None:
        """Drop the engine (the model and the KV cache) once stopped."""
        ...


def _info_of(engine: Any) -> EngineInfo:
    return EngineInfo(
        engine.tokenizer,
        engine.model_config,
        getattr(engine, "vocab_size", None),
        engine.get_stats(),
    )


class ThreadTransport:
    """The engine loop in one thread here, which owns the LLMEngine (no locks on engine state)."""

    def __init__(self, engine: Any = None, args: EngineArgs | None = None):
        if engine is None and args is None:
            raise ValueError("pass an LLMEngine or EngineArgs")
        self.engine = engine  # the LLMEngine; owned by the thread once started
        self._owns_engine = engine is None  # built here from args: shut down here
        self.args = args
        self.thread: threading.Thread | None = None
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._died = False

    def info(self) -> EngineInfo | None:
        return None if self.engine is None else _info_of(self.engine)

    async def start(self, post: Post, die: Die) -> EngineInfo:
        admit = AdmitWindow.from_env()  # a bad value fails the start, not the first request
        if self.engine is None:
            from asyncllm.engine.llm_engine import LLMEngine

            assert self.args is not None
            self.engine = await anyio.to_thread.run_sync(LLMEngine.from_engine_args, self.args)
        info = _info_of(self.engine)
        self.thread = threading.Thread(
            target=self._run, args=(post, die, admit), name="asyncllm-engine", daemon=True
        )
        self.thread.start()
        return info

    def send(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    async def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self._inbox.put(Shutdown())
            # A dead engine's thread may be stuck in a device wait for a dead rank: give up on
            # it (a daemon) rather than hang the shutdown.
            timeout = DEAD_THREAD_JOIN_S if self._died else None
            await anyio.to_thread.run_sync(self.thread.join, timeout)
        shutdown = getattr(self.engine, "shutdown", None)
        if self._owns_engine and shutdown is not None:
            # Its tensor-parallel ranks stop with it (a few 100 ms). An adopted engine's owner
            # (e.g. an LLM) stops its own.
            await anyio.to_thread.run_sync(shutdown)

    def release(self) -> None:
        self.engine = None

    def _run(self, post: Post, die: Die, admit: AdmitWindow) -> None:
        inbox = self._inbox
        lock = threading.Lock()

        def die_once(message: str, cause: BaseException | None) -> None:
            with lock:
                if self._died:
                    return
                self._died = True
            die(message, cause)

        def rank_died(fail: Fail) -> None:
            # Now, from the monitor thread: the engine thread may be blocked in the step that
            # waits for the dead rank. The Fail command ends the loop when it gets there (or
            # at once, when it sleeps waiting for work).
            inbox.put(fail)
            die_once(f"the engine died: {fail.message}", None)

        watch_engine(self.engine, rank_died)

        def get_commands(timeout: float | None) -> list[Command]:
            cmds: list[Command] = []
            if timeout is None or timeout > 0:
                try:
                    cmds.append(inbox.get(timeout=timeout))
                except queue.Empty:
                    return cmds
            while True:
                try:
                    cmds.append(inbox.get_nowait())
                except queue.Empty:
                    return cmds

        try:
            profiled("engine-thread", run_engine_loop, self.engine, get_commands, post, admit=admit)
        except BaseException as e:
            logger.exception("asyncllm: the engine thread died")
            die_once(f"the engine thread died: {type(e).__name__}: {e}", e)


class ProcessTransport:
    """The engine loop in a spawned child process; two threads here cross to it."""

    def __init__(self, args: EngineArgs, factory: Callable[[EngineArgs], Any] | None = None):
        self.args = args
        self.factory = factory  # builds the engine in the child; picklable, top level
        self.proc: Any = None  # the EngineProcess, once started
        self.sender: threading.Thread | None = None
        self.receiver: threading.Thread | None = None
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()

    def info(self) -> EngineInfo | None:
        return None

    async def start(self, post: Post, die: Die) -> EngineInfo:
        from asyncllm.engine.engine_process import EngineProcess

        proc = EngineProcess(self.args, self.factory)
        payload = await anyio.to_thread.run_sync(proc.start)
        self.proc = proc
        # The child's own tokenizer, pickled: servers need it here (chat templates, limits).
        info = EngineInfo(
            payload["tokenizer"], payload["model_config"], payload["vocab_size"], payload["stats"]
        )
        self.sender = threading.Thread(
            target=self._run_sender, name="asyncllm-engine-sender", daemon=True
        )
        self.receiver = threading.Thread(
            target=profiled,
            args=("engine-receiver", self._receive, post, die),
            name="asyncllm-engine-receiver",
            daemon=True,
        )
        self.sender.start()
        self.receiver.start()
        return info

    def send(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    async def stop(self) -> None:
        if self.receiver is not None and self.receiver.is_alive():
            self._inbox.put(Shutdown())
            await anyio.to_thread.run_sync(self.receiver.join)
        if self.proc is not None:
            self._inbox.put(Shutdown())  # the sender may still wait (the child died)
            await anyio.to_thread.run_sync(self.proc.join)
            self.proc.close()

    def release(self) -> None:
        pass  # the engine lives and dies with the child

    def _run_sender(self) -> None:
        """Forward the inbox: everything queued at a wake-up goes as one pipe message. One
        message per command let a wave of new requests reach the engine in dribs: after each
        write this thread needs the GIL back, and a busy event loop hands it over only at the
        switch interval (5 ms), so 64 commands arrived over as many engine steps (each one a
        mixed prefill step on a GPU); see ops/bench/NOTES.md, "Serving, third round"."""
        proc = self.proc
        inbox = self._inbox
        while True:
            cmds = [inbox.get()]
            while True:
                try:
                    cmds.append(inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                proc.send(cmds)
            except (OSError, ValueError):  # the child is gone: the receiver reports it
                return
            if any(isinstance(c, Shutdown) for c in cmds):
                return

    def _receive(self, post: Post, die: Die) -> None:
        proc = self.proc
        while True:
            kind, payload = proc.recv()
            if kind == "out":
                items, stats = payload
                if not post(items, stats):
                    self._inbox.put(Shutdown())  # nobody is listening any more
            elif kind == "dead":
                logger.error("asyncllm: %s", payload)
                die(f"the engine process died: {payload}", None)
                self._inbox.put(Shutdown())  # release the sender
                return
            else:  # "bye": the child has shut down
                return
