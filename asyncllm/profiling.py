"""Opt-in cProfile of the long-running threads, for finding where host time goes in a real run
(on a lent GPU there is no interactive profiler): with `ASYNCLLM_PROFILE_DIR=DIR` set, the engine
loop (thread or engine process), the engine process's receiver thread and the gateway's event
loop (from its lifespan's start to its end) each write `DIR/<name>-<pid>.pstats` when they end. Unset (the default): a plain call.
cProfile slows Python-heavy code, so time runs without it and read profiles for the shares.

Python 3.12+ allows one active profiler per process and it sees every thread: there the first
one started (the gateway's loop, in a server) holds the whole process's profile, and the others
say so in the log and run unprofiled."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from asyncllm import envs

T = TypeVar("T")

ENV = "ASYNCLLM_PROFILE_DIR"
logger = logging.getLogger(__name__)


def _enable(name: str) -> Any:
    """A running cProfile.Profile, or None where another profiler is already active."""
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.enable()
    except ValueError as e:  # 3.12+: "Another profiling tool is already active"
        logger.warning("asyncllm: not profiling %s separately: %s", name, e)
        return None
    return prof


def _dump(prof: Any, out: str, name: str) -> None:
    prof.disable()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(path / f"{name}-{os.getpid()}.pstats")


def profiled(name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """`fn(*args, **kw)`, under cProfile when ASYNCLLM_PROFILE_DIR is set."""
    out = envs.profile_dir()
    prof = _enable(name) if out else None
    if prof is None:
        return fn(*args, **kw)
    try:
        return fn(*args, **kw)
    finally:
        _dump(prof, out or ".", name)


class ThreadProfile:
    """cProfile of the calling thread from `start()` to `stop()` (for a thread we do not start
    ourselves: the server's event loop, profiled from the app's lifespan)."""

    def __init__(self, name: str):
        self.name = name
        self.out = envs.profile_dir()
        self._prof: Any = None

    def start(self) -> None:
        if self.out:
            self._prof = _enable(self.name)

    def stop(self) -> None:
        if self._prof is not None:
            _dump(self._prof, self.out or ".", self.name)
            self._prof = None
