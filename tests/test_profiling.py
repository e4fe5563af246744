"""ASYNCLLM_PROFILE_DIR: the opt-in profiles of the long-running threads."""

from __future__ import annotations

import os
import pstats
import threading

from asyncllm import profiling


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


def test_profiled_is_a_plain_call_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.ENV, raising=False)
    assert profiling.profiled("x", _work, 10) == _work(10)
    p = profiling.ThreadProfile("y")
    p.start()
    p.stop()
    assert not list(tmp_path.iterdir())


def test_profiles_are_written_per_name_and_pid(tmp_path, monkeypatch):
    out = tmp_path / "prof"
    monkeypatch.setenv(profiling.ENV, str(out))
    assert profiling.profiled("engine-thread", _work, 1000) == _work(1000)

    def in_thread() -> None:
        p = profiling.ThreadProfile("server-loop")
        p.start()
        _work(2000)
        p.stop()

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    names = sorted(f.name for f in out.iterdir())
    pid = os.getpid()
    assert names == [f"engine-thread-{pid}.pstats", f"server-loop-{pid}.pstats"]
    for f in out.iterdir():
        funcs = {k[2] for k in pstats.Stats(str(f)).stats}
        assert "_work" in funcs  # the profiled code is in it


def test_a_second_profiler_where_python_allows_one_runs_unprofiled(tmp_path, monkeypatch):
    """Python 3.12+ refuses a second active profiler ("Another profiling tool is already
    active"): the call still runs, just without its own file."""
    import cProfile

    def refuse(self):
        raise ValueError("Another profiling tool is already active")

    monkeypatch.setenv(profiling.ENV, str(tmp_path))
    monkeypatch.setattr(cProfile.Profile, "enable", refuse)
    assert profiling.profiled("engine-receiver", _work, 100) == _work(100)
    p = profiling.ThreadProfile("server-loop")
    p.start()
    p.stop()
    assert not list(tmp_path.iterdir())
