"""The engine loop in a child process of its own (EngineArgs.engine_process).

Why: on a GPU the engine's per-step work is Python, and in one process it shares the GIL with the
event loop that streams its outputs; a server with hundreds of streams then slows the engine
itself. In its own process the engine loop runs unimpeded, and only pickled commands and output
batches cross (vLLM's engine core process for the same reason).

The crossings stay the two of AsyncLLMEngine: commands go down a pipe (a sender thread here
forwards the inbox), and once per step the child sends every request's merged output up the pipe
(a receiver thread here posts it to the outbox). A request's prompt goes up with its first output
only. The child is started with "spawn" (CUDA cannot be forked), so programs that use it need the
usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from typing import Any

from asyncllm.config import EngineArgs
from asyncllm.engine.engine_loop import Command, Item, run_engine_loop
from asyncllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large model (and capturing graphs) can take minutes


class EngineProcessError(RuntimeError):
    """The engine process could not start, or it died."""


class EngineProcess:
    """This side of the engine process: start it, send it commands, receive its messages."""

    def __init__(self, args: EngineArgs):
        self.args = dataclasses.replace(args, engine_process=False)  # the child runs in-process
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=child_main, args=(self.args, child_conn), name="asyncllm-engine", daemon=True
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

    def send(self, cmd: Command) -> None:
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

    def _restore(self, items: dict[str, Item]) -> dict[str, Item]:
        """Put back the prompt the child sent only with each request's first output."""
        for rid, item in items.items():
            if isinstance(item, RequestOutput):
                if item.prompt_token_ids is None:
                    prompt, ids = self._prompts.get(rid, (None, []))
                    items[rid] = item = dataclasses.replace(
                        item, prompt=prompt, prompt_token_ids=ids
                    )
                else:
                    self._prompts[rid] = (item.prompt, item.prompt_token_ids)
                if item.finished:
                    self._prompts.pop(rid, None)
            else:
                self._prompts.pop(rid, None)
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


def child_main(args: EngineArgs, conn: Any) -> None:
    """The child: build the engine, then run the engine loop over the pipe."""
    from asyncllm.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine.from_engine_args(args)
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
                "vocab_size": engine.vocab_size,
                "stats": engine.get_stats(),
            },
        )
    )
    prompt_sent: set[str] = set()

    def get_commands(block: bool) -> list[Command]:
        cmds = [conn.recv()] if block else []
        while conn.poll():
            cmds.append(conn.recv())
        return cmds

    def post(items: dict[str, Item], stats: Any) -> bool:
        for rid, item in items.items():
            if isinstance(item, RequestOutput):
                if rid in prompt_sent:
                    items[rid] = item = dataclasses.replace(
                        item, prompt=None, prompt_token_ids=None
                    )
                else:
                    prompt_sent.add(rid)
                if item.finished:
                    prompt_sent.discard(rid)
            else:
                prompt_sent.discard(rid)
        conn.send(("out", (items, stats)))
        return True

    try:
        run_engine_loop(engine, get_commands, post)
    except BaseException as e:  # noqa: BLE001
        logger.exception("asyncllm: the engine process died")
        try:
            conn.send(("dead", f"{type(e).__name__}: {e}"))
        except Exception:
            pass
        return
    conn.send(("bye", None))
