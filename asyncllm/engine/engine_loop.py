"""The loop that owns an LLMEngine: commands in (add, abort, shutdown), one step, the step's outputs
out, merged per request. AsyncLLMEngine runs it in a thread of its own process, or (with
`engine_process`) in a child process (engine_process.py); the loop is the same either way.

It blocks for a command only when the engine has nothing to compute, and it never waits for
anyone to read its outputs: `post` hands them over and returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def run_engine_loop(
    engine: Any,
    get_commands: Callable[[bool], list[Command]],
    post: Callable[[dict[str, Item], Any], bool],
    kinds: dict[str, RequestOutputKind] | None = None,
) -> None:
    """Until a Shutdown command (or `post` returning False: nobody is listening any more).

    `get_commands(block)`: every queued command, waiting for at least one if `block`.
    `post(items, stats)`: this round's items by request id, and the engine's stats after it.
    `kinds`: the live requests' output kinds, kept here (a request's entry stays until after
    the post of its last item); pass a dict to read them from `post`, for merging.
    Exceptions from a step propagate: the caller turns them into the engine's death."""
    if kinds is None:
        kinds = {}
    while True:
        cmds = get_commands(not engine.has_unfinished_requests())
        items: dict[str, Item] = {}
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
