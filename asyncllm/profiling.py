"""Opt-in cProfile of the long-running threads, for finding where host time goes in a real run
(on a lent GPU there is no interactive profiler): with `ASYNCLLM_PROFILE_DIR=DIR` set, the engine
loop (thread or engine process), the engine process's receiver thread and the gateway's event
loop (from its lifespan's start to its end) each write `DIR/<name>-<pid>.pstats` when they end. Unset (the default): a plain call.
cProfile slows Python-heavy code, so time runs without it and read profiles for the shares."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "ASYNCLLM_PROFILE_DIR"


def profiled(name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """`fn(*args, **kw)`, under cProfile when ASYNCLLM_PROFILE_DIR is set."""
    out = os.environ.get(ENV)
    if not out:
        return fn(*args, **kw)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn, *args, **kw)
    finally:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(path / f"{name}-{os.getpid()}.pstats")


class ThreadProfile:
    """cProfile of the calling thread from `start()` to `stop()` (for a thread we do not start
    ourselves: the server's event loop, profiled from the app's lifespan)."""

    def __init__(self, name: str):
        self.name = name
        self.out = os.environ.get(ENV)
        self._prof: Any = None

    def start(self) -> None:
        if self.out:
            import cProfile

            self._prof = cProfile.Profile()
            self._prof.enable()

    def stop(self) -> None:
        if self._prof is not None:
            self._prof.disable()
            path = Path(self.out or ".")
            path.mkdir(parents=True, exist_ok=True)
            self._prof.dump_stats(path / f"{self.name}-{os.getpid()}.pstats")
            self._prof = None
