"""The loop that owns an LLMEngine: commands in (add, abort, shutdown), one step, the step's outputs
out, merged per request. AsyncLLMEngine runs it in a thread of its own process, or (with
`engine_process`) in a child process (engine_process.py); the loop is the same either way.

It blocks for a command only when the engine has nothing to compute (and, with an admission
window, briefly after waking with new requests: AdmitWindow), and it never waits for anyone to
read its outputs: `post` hands them over and returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncllm import envs
from asyncllm.engine.stream import merge_outputs
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class Add:
    request_id: str
    prompt: Any  # PromptType, or None when `messages` is set
    params: SamplingParams
    priority: int
    messages: list[dict[str, Any]] | None = None


@dataclass
class Abort:
    request_id: str


class Shutdown:
    pass


@dataclass
class Fail:
    """Put in the loop's inbox by the engine itself, never by a caller: a part of the engine
    outside the loop's thread died (a tensor-parallel rank), so the loop must die even while it
    sleeps waiting for work."""

    message: str


class EngineFailure(RuntimeError):
    """What the loop raises on a Fail command."""


Command = Add | Abort | Shutdown | Fail
Item = RequestOutput | BaseException  # what the loop hands over per request


@dataclass(frozen=True)
class AdmitWindow:
    """How long an idle loop that woke with new requests keeps taking commands before its first
    step: until `quiet_s` pass without a new one, `max_s` at most. On a GPU every step that admits
    a prompt is a mixed step (eager, several decode steps long); a wave of requests that reaches
    an idle engine in pieces cost one such step per piece (ops/bench/NOTES.md, "Serving, fourth
    round"). `max_s` 0: off."""

    max_s: float = 0.0
    quiet_s: float = 0.0

    @classmethod
    def from_env(cls) -> AdmitWindow:
        return cls(envs.admit_coalesce_ms() / 1e3, envs.admit_quiet_ms() / 1e3)


def run_engine_loop(
    engine: Any,
    get_commands: Callable[[float | None], list[Command]],
    post: Callable[[dict[str, Item], Any], bool],
    kinds: dict[str, RequestOutputKind] | None = None,
    admit: AdmitWindow | None = None,
) -> None:
    """Until a Shutdown command (or `post` returning False: nobody is listening any more).

    `get_commands(timeout)`: every queued command; if there is none, waits for one up to
    `timeout` seconds (None: for ever, 0: not at all).
    `post(items, stats)`: this round's items by request id, and the engine's stats after it.
    `kinds`: the live requests' output kinds, kept here (a request's entry stays until after
    the post of its last item); pass a dict to read them from `post`, for merging.
    `admit`: the admission window (default: from ASYNCLLM_ADMIT_COALESCE_MS / _QUIET_MS).
    Exceptions from a step propagate: the caller turns them into the engine's death."""
    if kinds is None:
        kinds = {}
    if admit is None:
        admit = AdmitWindow.from_env()
    while True:
        idle = not engine.has_unfinished_requests()
        cmds = get_commands(None if idle else 0.0)  # idle: sleep until there is work
        items: dict[str, Item] = {}
        stop = _apply(engine, cmds, items, kinds)
        if idle and admit.max_s > 0 and not stop and engine.has_unfinished_requests():
            # Woke with work: the rest of its wave is likely on its way. Add what arrives
            # meanwhile (adding is work the step would wait for anyway), then step once.
            deadline = time.monotonic() + admit.max_s
            while not stop and (left := deadline - time.monotonic()) > 0:
                more = get_commands(min(admit.quiet_s, left))
                if not more:
                    break
                stop = _apply(engine, more, items, kinds)
        if stop:
            _emit(items, engine.abort_request(list(kinds)), kinds)
        elif engine.has_unfinished_requests():
            _emit(items, engine.step(), kinds)
        posted = post(items, engine.get_stats())
        # Only now forget finished requests' kinds: post may merge with them.
        for rid, item in items.items():
            if not isinstance(item, RequestOutput) or item.finished:
                kinds.pop(rid, None)
        if not posted or stop:
            return


def _apply(
    engine: Any, cmds: list[Command], items: dict[str, Item], kinds: dict[str, RequestOutputKind]
) -> bool:
    """Carry out `cmds` in order; True if one was a Shutdown (requests added after it are
    aborted with the rest)."""
    stop = False
    for cmd in cmds:
        if isinstance(cmd, Fail):
            raise EngineFailure(cmd.message)
        if isinstance(cmd, Add):
            _add(engine, cmd, items, kinds)
        elif isinstance(cmd, Abort):
            if cmd.request_id in kinds:
                _emit(items, engine.abort_request(cmd.request_id), kinds)
        else:
            stop = True
    return stop


def watch_engine(engine: Any, wake: Callable[[Fail], None]) -> None:
    """Have `wake(Fail(message))` called (from another thread) if the engine's executor loses a
    part of itself; the caller puts it where the loop reads its commands."""
    add = getattr(getattr(engine, "executor", None), "add_failure_callback", None)
    if add is not None:
        add(lambda message: wake(Fail(message)))


def _add(
    engine: Any, cmd: Add, items: dict[str, Item], kinds: dict[str, RequestOutputKind]
) -> None:
    """Add one request; bad input fails that request only (its stream gets the error)."""
    try:
        prompt = cmd.prompt
        if cmd.messages is not None:
            prompt = {"prompt_token_ids": engine.apply_chat_template(cmd.messages)}
        engine.add_request(cmd.request_id, prompt, cmd.params, priority=cmd.priority)
    except ValueError as e:
        items[cmd.request_id] = e
    except Exception as e:  # e.g. a TypeError from odd input: still the caller's problem
        err = ValueError(f"invalid request: {type(e).__name__}: {e}")
        err.__cause__ = e
        items[cmd.request_id] = err
    else:
        kinds[cmd.request_id] = cmd.params.output_kind


def _emit(
    items: dict[str, Item], outputs: list[RequestOutput], kinds: dict[str, RequestOutputKind]
) -> None:
    for out in outputs:
        rid = out.request_id
        prev = items.get(rid)
        if isinstance(prev, RequestOutput):
            out = merge_outputs(prev, out, kinds[rid])
        items[rid] = out


def merge_items(
    box: dict[str, Item], items: dict[str, Item], kinds: dict[str, RequestOutputKind]
) -> None:
    """Add `items` to outputs still waiting in `box`: a request's outputs merge (by its kind),
    an exception replaces whatever waited."""
    for rid, item in items.items():
        prev = box.get(rid)
        if isinstance(prev, RequestOutput) and isinstance(item, RequestOutput):
            kind = kinds.get(rid, RequestOutputKind.CUMULATIVE)
            box[rid] = merge_outputs(prev, item, kind)
        else:
            box[rid] = item
