"""run_engine_loop's admission window (AdmitWindow): an idle loop that wakes with new requests
keeps taking the commands that arrive within the window before its first step, so a wave that
reaches it in pieces is admitted in one step; a busy loop never waits; aborts, shutdown and a
dead rank still end what they end. The unit tests run on a fake clock (timed arrivals); the last
two run the real transports (thread and process) on the gateway benchmark's stub engine."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import pytest

from asyncllm.engine import engine_loop
from asyncllm.engine.engine_loop import (
    Abort,
    Add,
    AdmitWindow,
    EngineFailure,
    Fail,
    Shutdown,
    run_engine_loop,
)
from asyncllm.outputs import CompletionOutput, RequestOutput
from asyncllm.sampling_params import RequestOutputKind, SamplingParams

MS = 1e-3
WINDOW = AdmitWindow(max_s=2 * MS, quiet_s=0.3 * MS)


def params(n: int = 2) -> SamplingParams:
    return SamplingParams(max_tokens=n, output_kind=RequestOutputKind.DELTA)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeEngine:
    """Each step takes `step_s` of the fake clock and gives every request one token."""

    clock: Clock
    step_s: float = 2 * MS
    live: dict[str, int] = field(default_factory=dict)  # request id -> tokens left
    steps: list[tuple[float, list[str]]] = field(default_factory=list)  # (start, requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def add_request(self, rid, prompt, params, priority=0) -> None:
        self.live[rid] = params.max_tokens

    def abort_request(self, rids) -> list[RequestOutput]:
        rids = [rids] if isinstance(rids, str) else rids
        outs = []
        for rid in rids:
            if self.live.pop(rid, None) is not None:
                c = CompletionOutput(0, "", [], None, None, "abort")
                outs.append(RequestOutput(rid, None, [1], [c], finished=True))
        return outs

    def step(self) -> list[RequestOutput]:
        self.steps.append((self.clock.t, sorted(self.live)))
        self.clock.t += self.step_s
        outs = []
        for rid in list(self.live):
            self.live[rid] -= 1
            done = self.live[rid] == 0
            c = CompletionOutput(0, "x", [1], None, None, "length" if done else None)
            outs.append(RequestOutput(rid, None, [1], [c], finished=done))
            if done:
                del self.live[rid]
        return outs

    def get_stats(self) -> int:
        return len(self.steps)


class Arrivals:
    """get_commands over timed arrivals on the fake clock: waiting for a command moves the clock
    to its arrival (or by the whole timeout when none comes in time)."""

    def __init__(self, clock: Clock, timed: list[tuple[float, object]]) -> None:
        self.clock = clock
        self.timed = sorted(timed, key=lambda x: x[0])
        self.timeouts: list[float | None] = []

    def __call__(self, timeout: float | None) -> list:
        self.timeouts.append(timeout)
        if not self.timed:
            assert timeout is not None, "the loop would sleep for ever"
        now = self.clock.t
        if self.timed and self.timed[0][0] > now and timeout != 0.0:
            nxt = self.timed[0][0]
            if timeout is None or nxt <= now + timeout:
                self.clock.t = nxt
            else:
                self.clock.t = now + timeout
        out = []
        while self.timed and self.timed[0][0] <= self.clock.t:
            out.append(self.timed.pop(0)[1])
        return out


def run(timed, window: AdmitWindow, monkeypatch, n_tokens: int = 2):
    """Run the loop over `timed` arrivals; returns the engine, the posts and the arrivals."""
    clock = Clock()
    monkeypatch.setattr(engine_loop.time, "monotonic", clock)
    eng = FakeEngine(clock)
    arrivals = Arrivals(clock, timed)
    posts: list[dict] = []

    def post(items, stats) -> bool:
        posts.append(items)
        return True

    run_engine_loop(eng, arrivals, post, admit=window)
    return eng, posts, arrivals


def add(rid: str, n: int = 2) -> Add:
    return Add(rid, {"prompt_token_ids": [1]}, params(n), 0)


def test_a_wave_in_pieces_within_the_window_is_admitted_in_one_step(monkeypatch):
    # Four pieces 0.2 ms apart (each gap under the 0.3 ms quiet time), then silence.
    timed = [(i * 0.2 * MS, add(f"r{i}")) for i in range(4)] + [(50 * MS, Shutdown())]
    eng, posts, _ = run(timed, WINDOW, monkeypatch)
    assert eng.steps[0] == (pytest.approx(0.9 * MS), ["r0", "r1", "r2", "r3"])
    assert len(eng.steps) == 2  # two tokens each, all in step
    # Off, the same arrivals take a step per piece that landed after a step began.
    eng, _, _ = run(timed, AdmitWindow(), monkeypatch)
    assert eng.steps[0] == (0.0, ["r0"])
    assert len(eng.steps) > 2


def test_a_lone_request_waits_the_quiet_time_and_a_trickle_at_most_the_window(monkeypatch):
    eng, _, _ = run([(0.0, add("a")), (50 * MS, Shutdown())], WINDOW, monkeypatch)
    assert eng.steps[0] == (pytest.approx(0.3 * MS), ["a"])
    # A command every 0.24 ms never leaves the loop quiet: it steps when the 2 ms are up, with
    # what came by then, and admits the rest at the next step (busy: no wait).
    timed = [(i * 0.24 * MS, add(f"r{i:02}")) for i in range(20)] + [(50 * MS, Shutdown())]
    eng, _, arrivals = run(timed, WINDOW, monkeypatch)
    start, first = eng.steps[0]
    assert start == pytest.approx(2 * MS)
    assert first == [f"r{i:02}" for i in range(9)]  # arrivals at 0 .. 1.92 ms
    assert eng.steps[1][0] == pytest.approx(4 * MS)
    assert max(t for t in arrivals.timeouts if t is not None) <= WINDOW.quiet_s


def test_a_busy_engine_never_waits(monkeypatch):
    # r1 and r2 land while r0 runs: each is taken at the next step, no window.
    timed = [
        (0.0, add("r0", 10)),
        (3 * MS, add("r1")),
        (3.1 * MS, add("r2")),
        (60 * MS, Shutdown()),
    ]
    eng, _, arrivals = run(timed, WINDOW, monkeypatch)
    assert eng.steps[1] == (pytest.approx(2.3 * MS), ["r0"])
    assert eng.steps[2] == (pytest.approx(4.3 * MS), ["r0", "r1", "r2"])
    # r0's wake-up window (one quiet time), then only polls until the engine is idle again.
    assert arrivals.timeouts == [None, WINDOW.quiet_s] + [0.0] * 9 + [None]


def test_aborts_shutdown_and_failure_within_the_window(monkeypatch):
    # Added and aborted in one window: no step at all, the abort is posted.
    timed = [(0.0, add("a")), (0.1 * MS, Abort("a")), (10 * MS, Shutdown())]
    eng, posts, _ = run(timed, WINDOW, monkeypatch)
    assert eng.steps == []
    assert posts[0]["a"].finished and posts[0]["a"].outputs[0].finish_reason == "abort"
    # A shutdown in the window ends the loop at once, every request aborted.
    timed = [(0.0, add("a")), (0.1 * MS, add("b")), (0.2 * MS, Shutdown())]
    eng, posts, _ = run(timed, WINDOW, monkeypatch)
    assert eng.steps == []
    assert sorted(posts[-1]) == ["a", "b"]
    assert all(o.outputs[0].finish_reason == "abort" for o in posts[-1].values())
    # A dead rank's Fail in the window kills the loop.
    with pytest.raises(EngineFailure, match="rank 1"):
        run([(0.0, add("a")), (0.1 * MS, Fail("rank 1"))], WINDOW, monkeypatch)


def test_an_invalid_request_alone_does_not_wait(monkeypatch):
    class Refuses(FakeEngine):
        def add_request(self, rid, prompt, params, priority=0) -> None:
            raise ValueError("prompt too long")

    clock = Clock()
    monkeypatch.setattr(engine_loop.time, "monotonic", clock)
    arrivals = Arrivals(clock, [(0.0, add("bad")), (10 * MS, Shutdown())])
    posts: list[dict] = []
    run_engine_loop(Refuses(clock), arrivals, lambda i, s: posts.append(i) or True, admit=WINDOW)
    assert isinstance(posts[0]["bad"], ValueError)
    assert arrivals.timeouts == [None, None]  # the error posted at once, then asleep again


def test_the_window_from_the_environment(monkeypatch):
    from asyncllm import envs

    monkeypatch.delenv("ASYNCLLM_ADMIT_COALESCE_MS", raising=False)
    monkeypatch.delenv("ASYNCLLM_ADMIT_QUIET_MS", raising=False)
    assert AdmitWindow.from_env().max_s == 0.0
    monkeypatch.setenv("ASYNCLLM_ADMIT_COALESCE_MS", "2")
    monkeypatch.setenv("ASYNCLLM_ADMIT_QUIET_MS", "0.5")
    assert AdmitWindow.from_env() == AdmitWindow(2e-3, 0.5e-3)
    for bad in ("soon", "-1", "5000"):
        monkeypatch.setenv("ASYNCLLM_ADMIT_COALESCE_MS", bad)
        with pytest.raises(ValueError, match="ASYNCLLM_ADMIT_COALESCE_MS"):
            envs.admit_coalesce_ms()


# ---- the real transports ------------------------------------------------------------------------
SPACING_S = 0.02  # between the pieces of a wave; far inside the quiet time below, on a loaded box


def _window_env(monkeypatch) -> None:
    monkeypatch.setenv("ASYNCLLM_ADMIT_COALESCE_MS", "1000")
    monkeypatch.setenv("ASYNCLLM_ADMIT_QUIET_MS", "300")


@pytest.mark.parametrize("on", [True, False])
def test_the_process_transport_waits_with_a_timeout(monkeypatch, on):
    from asyncllm.bench import gateway_cost
    from asyncllm.config import EngineArgs
    from asyncllm.engine.engine_process import EngineProcess

    if on:
        _window_env(monkeypatch)
    else:
        monkeypatch.setenv("ASYNCLLM_ADMIT_COALESCE_MS", "0")
    factory = functools.partial(gateway_cost.stub_engine, 0.002, None)
    proc = EngineProcess(EngineArgs(model="unused"), factory)
    proc.start()
    try:
        for i in range(3):
            proc.send([add(f"r{i}", 20)])
            time.sleep(SPACING_S)
        done: set[str] = set()
        stats = None
        while len(done) < 3:
            kind, payload = proc.recv()
            assert kind == "out", (kind, payload)
            items, stats = payload
            done |= {rid for rid, o in items.items() if o.finished}
        assert stats.admitted == 3
        # On: one admitting step. Off: each piece landed steps after the last (2 ms steps).
        assert stats.admit_steps == (1 if on else 3)
    finally:
        proc.send(Shutdown())
        while proc.recv()[0] == "out":
            pass
        proc.join()


@pytest.mark.anyio
async def test_the_thread_transport_waits_with_a_timeout(monkeypatch):
    import anyio

    from asyncllm import AsyncLLMEngine
    from asyncllm.bench.gateway_cost import StubLLMEngine

    _window_env(monkeypatch)
    stub = StubLLMEngine(0.002)
    async with AsyncLLMEngine(engine=stub) as eng:

        async def one(i: int) -> None:
            async for _ in eng.generate({"prompt_token_ids": [1]}, params(20), f"r{i}"):
                pass

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, i)
                    await anyio.sleep(SPACING_S)
    assert (stub.acc.admitted, stub.acc.admit_steps) == (3, 1)
