"""The engine loop in a child process of its own (EngineArgs.engine_process).

Why: on a GPU the engine's per-step work is Python, and in one process it shares the GIL with the
event loop that streams its outputs; a server with hundreds of streams then slows the engine
itself. In its own process the engine loop runs unimpeded, and only pickled commands and output
batches cross (vLLM's engine core process for the same reason).

The crossings stay the two of AsyncLLMEngine: commands go down a pipe (a sender thread here
forwards the inbox), and once per step the child hands every request's merged output to its
own sender thread, which writes it up the pipe (a receiver thread here posts it to the outbox):
outputs that wait for a slow reader merge, the engine never waits. Outputs travel as plain
tuples (`pack` / `unpack`: unpickling dataclasses costs the server several microseconds per
output), and a request's prompt goes up with its first output only. The child is started with
"spawn" (CUDA cannot be forked), so programs that use it need the
usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from asyncllm.config import EngineArgs
from asyncllm.engine.engine_loop import (
    AdmitWindow,
    Command,
    Item,
    merge_items,
    run_engine_loop,
    watch_engine,
)
from asyncllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from asyncllm.profiling import profiled
from asyncllm.sampling_params import RequestOutputKind

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large model (and capturing graphs) can take minutes


class EngineProcessError(RuntimeError):
    """The engine process could not start, or it died."""


class EngineProcess:
    """This side of the engine process: start it, send it commands, receive its messages."""

    def __init__(self, args: EngineArgs, factory: Callable[[EngineArgs], Any] | None = None):
        self.args = dataclasses.replace(args, engine_process=False)  # the child runs in-process
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=child_main,
            args=(self.args, child_conn, factory),
            name="asyncllm-engine",
            daemon=True,
        )
        self._child_conn = child_conn
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}

    def start(self) -> dict[str, Any]:
        """Spawn the child and wait until its engine is loaded; its model config and stats.
        Blocking: call it from a worker thread."""
        self.proc.start()
        self._child_conn.close()  # the child has its own copy; EOF reaches us if it dies
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise EngineProcessError(f"the engine process did not start in {START_TIMEOUT_S} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise EngineProcessError(
                f"the engine process exited while starting (exit code {self.proc.exitcode})"
            ) from None
        if kind == "failed":
            self.proc.join(5)
            # The child's own error, re-raised here: a bad model path is still a ValueError.
            raise payload
        assert kind == "ready", kind
        return payload

    def send(self, cmd: Command | list[Command]) -> None:
        """One command, or a list of them (one pipe message: ProcessTransport's sender)."""
        self.conn.send(cmd)

    def recv(self) -> tuple[str, Any]:
        """The next message: ("out", (items, stats)), ("dead", message) or ("bye", None). EOF
        (the child is gone without a word) comes out as "dead"."""
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode
            return "dead", f"the engine process exited unexpectedly (exit code {code})"
        if kind == "out":
            items, stats = payload
            return kind, (self._restore(items), stats)
        return kind, payload

    def _restore(self, packed: list[tuple[str, Any]]) -> dict[str, Item]:
        """Rebuild the outputs, with the prompt the child sent only once per request."""
        items: dict[str, Item] = {}
        prompts = self._prompts
        for rid, p in packed:
            if isinstance(p, BaseException):
                prompts.pop(rid, None)
                items[rid] = p
                continue
            out = unpack(rid, p)
            if out.prompt_token_ids is None:
                out.prompt, out.prompt_token_ids = prompts.get(rid, (None, []))
            else:
                prompts[rid] = (out.prompt, out.prompt_token_ids)
            if out.finished:
                prompts.pop(rid, None)
            items[rid] = out
        return items

    def join(self, timeout: float = 30.0) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            logger.warning("asyncllm: the engine process did not exit; killing it")
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self) -> None:
        self.conn.close()


def child_main(
    args: EngineArgs, conn: Any, factory: Callable[[EngineArgs], Any] | None = None
) -> None:
    """The child: build the engine, then run the engine loop over the pipe. A factory runs
    before torch is imported here (a data-parallel one first picks its GPU)."""
    try:
        admit = AdmitWindow.from_env()  # a bad value fails the start, not the first request
        if factory is None:
            from asyncllm.engine.llm_engine import LLMEngine

            factory = LLMEngine.from_engine_args
        engine = factory(args)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        try:
            conn.send(("failed", e))
        except Exception:  # an exception that does not pickle
            conn.send(("failed", EngineProcessError(f"{type(e).__name__}: {e}")))
        return
    conn.send(
        (
            "ready",
            {
                "model_config": engine.model_config,
                "tokenizer": engine.tokenizer,
                "vocab_size": engine.vocab_size,
                "stats": engine.get_stats(),
            },
        )
    )
    # Everything loaded so far (torch, the model, the tokenizer) lives as long as the process:
    # take it out of the collector's view, so that a full collection, triggered by the outputs
    # made every step, scans only what came after instead of stalling a step for a long time.
    gc.collect()
    gc.freeze()
    kinds: dict[str, RequestOutputKind] = {}  # the loop's own, for merging waiting outputs

    # A dead tensor-parallel rank wakes the loop through a pipe of its own (the command pipe's
    # write end is the parent's).
    fail_r, fail_w = multiprocessing.Pipe(duplex=False)
    outbox = _Outbox(conn)

    def rank_died(fail: Any) -> None:
        fail_w.send(fail)
        # The parent hears of it now (after the outputs already made), even if the loop is
        # blocked in the step that waits for the dead rank.
        outbox.close(("dead", fail.message))

    watch_engine(engine, rank_died)

    def get_commands(timeout: float | None) -> list[Command]:
        if timeout is None or timeout > 0:
            wait([conn, fail_r], timeout)
        cmds: list[Command] = [fail_r.recv()] if fail_r.poll() else []
        while conn.poll():
            msg = conn.recv()  # a list: every command the parent's sender had queued
            if isinstance(msg, list):
                cmds.extend(msg)
            else:
                cmds.append(msg)
        return cmds

    def post(items: dict[str, Item], stats: Any) -> bool:
        outbox.put(items, stats, kinds)
        return True

    sender = threading.Thread(target=outbox.run, name="asyncllm-engine-outbox", daemon=True)
    sender.start()
    try:
        profiled("engine-process", run_engine_loop, engine, get_commands, post, kinds, admit)
    except BaseException as e:  # noqa: BLE001
        logger.exception("asyncllm: the engine process died")
        last: tuple[str, Any] = ("dead", f"{type(e).__name__}: {e}")
    else:
        last = ("bye", None)
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        shutdown()  # its tensor-parallel ranks, before the parent hears the end
    outbox.close(last)
    sender.join()
    # Back to the collector before exit: cycles left frozen are never freed, and extensions
    # notice (triton's nanobind module prints ~30 lines of "nanobind: leaked ..." otherwise).
    gc.unfreeze()


class _Outbox:
    """The child's side of the output pipe. The engine loop only merges its items in here; a
    sender thread pickles and writes them. So the engine never waits for a slow reader (a full
    pipe blocks the sender alone), and whatever piles up meanwhile goes as one message, merged
    per request, as AsyncLLMEngine's own outbox does in thread mode."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.items: dict[str, Item] = {}
        self.stats: Any = None
        self.last: tuple[str, Any] | None = None  # ("bye" | "dead", payload), after the rest
        self.cond = threading.Condition()
        self.prompt_sent: set[str] = set()

    def put(self, items: dict[str, Item], stats: Any, kinds: dict[str, RequestOutputKind]) -> None:
        with self.cond:
            merge_items(self.items, items, kinds)
            self.stats = stats
            self.cond.notify()

    def close(self, last: tuple[str, Any]) -> None:
        with self.cond:
            self.last = last
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while self.stats is None and self.last is None:
                    self.cond.wait()
                items, stats, self.items, self.stats = self.items, self.stats, {}, None
                last = self.last if stats is None else None
            try:
                if stats is not None:
                    self.conn.send(("out", (self._pack(items), stats)))
                elif last is not None:
                    self.conn.send(last)
                    return
            except (OSError, ValueError):  # the parent is gone: nobody to tell
                return

    def _pack(self, items: dict[str, Item]) -> list[tuple[str, Any]]:
        packed: list[tuple[str, Any]] = []
        sent = self.prompt_sent
        for rid, item in items.items():
            if isinstance(item, RequestOutput):
                first = rid not in sent
                sent.add(rid)
                if item.finished:
                    sent.discard(rid)
                packed.append((rid, pack(item, with_prompt=first)))
            else:
                sent.discard(rid)
                packed.append((rid, item))
        return packed


def pack(out: RequestOutput, with_prompt: bool) -> tuple:
    """A RequestOutput as plain tuples and lists (cheap to pickle and to unpickle)."""
    m = out.metrics
    return (
        out.prompt if with_prompt else None,
        out.prompt_token_ids if with_prompt else None,
        [
            (c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason,
             c.stop_reason)
            for c in out.outputs
        ],
        out.finished,
        out.prompt_logprobs,
        out.num_cached_tokens,
        None if m is None else (m.arrival_time, m.first_token_time, m.finished_time),
    )  # fmt: skip


def unpack(request_id: str, p: tuple) -> RequestOutput:
    prompt, ids, comps, finished, prompt_lp, cached, m = p
    return RequestOutput(
        request_id,
        prompt,
        ids,
        [CompletionOutput(*c) for c in comps],
        finished,
        prompt_lp,
        cached,
        None if m is None else RequestMetrics(*m),
    )
