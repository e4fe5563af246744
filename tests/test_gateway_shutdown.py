"""Graceful shutdown (asyncllm/gateway/shutdown.py): what Ctrl-C / SIGTERM does to open streams.

The server is stopped as uvicorn's signal handler stops it (should_exit), in the middle of long
streams: each WebSocket stream gets an `error` frame of code `shutting_down` and then its `done`,
the socket is closed with 1001, an SSE response ends with an error event and `data: [DONE]`,
the engine lets every request go, and all of it well within the shutdown timeout.
"""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from asyncllm.gateway import GatewaySettings
from asyncllm.protocol import SHUTTING_DOWN
from tests.gateway_helpers import WS, FakeEngine, run_server


def _sse_events(url: str, out: list, started: threading.Event) -> None:
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()


def test_shutdown_ends_ws_and_sse_streams_with_shutting_down():
    engine = FakeEngine(step_s=0.01, max_model_len=1 << 20)
    settings = GatewaySettings(shutdown_timeout=5.0, resume_ttl=60)
    with run_server(engine, settings) as srv:
        ws = WS(srv.ws_url())
        for i in (1, 2):
            ws.send(
                {"type": "complete", "id": i, "prompt": "x" * i, "params": {"max_tokens": 5000}}
            )
        while not (ws.of(1, "delta") and ws.of(2, "delta")):  # both streaming
            ws.recv()
        # a second socket that dropped mid-stream: its detached stream ends as well
        gone = WS(srv.ws_url())
        gone.send({"type": "complete", "id": "d", "prompt": "y", "params": {"max_tokens": 5000}})
        gone.until(lambda f: f["type"] == "delta")
        gone.close()
        sse: list = []
        started = threading.Event()
        t = threading.Thread(target=_sse_events, args=(srv.http, sse, started), daemon=True)
        t.start()
        assert started.wait(10)
        assert len(engine.active) == 4

        t0 = time.monotonic()
        srv.server.should_exit = True  # what uvicorn's SIGINT/SIGTERM handler does
        ws.until_done([1, 2], timeout=10)  # in either order
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        elapsed = time.monotonic() - t0
        t.join(10)

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
    for i in (1, 2):
        (err,) = ws.of(i, "error")
        assert err["code"] == SHUTTING_DOWN and "shutting down" in err["message"]
        done = ws.done(i)
        assert done["finish_reason"] == "error" and done["error"]["code"] == SHUTTING_DOWN
        # the error frame comes right before the done, after all the stream's deltas
        frames = ws.of(i)
        assert frames[-2:] == [err, done] and frames[-3]["type"] == "delta"
        assert done["seq"] == frames[-3]["seq"] + 1
    # the SSE response is finished, not cut: an error event, then [DONE]
    assert sse[0] == 200 and sse[-1] == "[DONE]", sse[-3:]
    last = orjson.loads(sse[-2])
    assert last["error"]["code"] == SHUTTING_DOWN, last
    assert all("choices" in orjson.loads(e) for e in sse[1:-2])
    assert not engine.active  # every request let go
    assert engine.stopped  # the lifespan shut the engine down after the drain
    assert elapsed < settings.shutdown_timeout, elapsed  # (it takes tens of ms when idle)


def test_nothing_is_admitted_while_shutting_down():
    engine = FakeEngine(step_s=0.01, max_model_len=1 << 20)
    with run_server(engine, GatewaySettings()) as srv:
        io = srv.app.state.io
        io.stopping = True  # the drain's first step, held here to look at it
        ws = WS(srv.ws_url())
        ws.send({"type": "complete", "id": 1, "prompt": "hi", "params": {"max_tokens": 5}})
        ws.until_done([1])
        assert ws.of(1, "error")[0]["code"] == SHUTTING_DOWN
        r = httpx.post(
            srv.http + "/v1/completions", json={"prompt": "hi", "max_tokens": 5}, timeout=10
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == SHUTTING_DOWN
        assert r.headers["Retry-After"] == "1"
        io.stopping = False
        ws.close()
    assert not engine.active


def test_shutdown_timeout_is_validated():
    with pytest.raises(ValueError, match="shutdown_timeout"):
        GatewaySettings(shutdown_timeout=-1)


QUIET_EXIT = """
import anyio, sys
from asyncllm.config import EngineArgs
from asyncllm.engine.async_engine import AsyncLLMEngine
from asyncllm.sampling_params import SamplingParams

async def main():
    args = EngineArgs(model=sys.argv[1], device="cpu", num_kv_blocks=32, max_model_len=128,
                      engine_process=sys.argv[2] == "process")
    async with AsyncLLMEngine.from_engine_args(args) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=3)):
            pass

if __name__ == "__main__":
    import gc
    anyio.run(main)
    if sys.argv[2] == "frozen":  # what asyncllm serve does with its own heap
        from asyncllm.gateway import GatewaySettings, build_app
        from starlette.testclient import TestClient
        from tests.gateway_helpers import FakeEngine
        with TestClient(build_app(FakeEngine(), GatewaySettings(freeze_gc=True))):
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
    print("ok")
"""


@pytest.mark.parametrize("mode", ["process", "frozen"])
def test_exit_prints_no_nanobind_leaks(tiny_model_dir, mode):
    """triton (imported by the engine, on the CPU too) is a nanobind extension that reports
    objects still alive at exit; gc.freeze() (the engine process, and asyncllm serve's gateway)
    kept cycles alive to the end. Both unfreeze on the way out."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", QUIET_EXIT, tiny_model_dir, mode],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert "nanobind" not in r.stderr, r.stderr
