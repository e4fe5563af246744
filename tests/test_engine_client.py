"""EngineClient, the gateway's contract with the engine: AsyncLLMEngine and the gateway tests' stub
engine both implement it (checked at run time and by mypy, which also checks the gateway's own
use of it), and the gateway serves either without probing for features."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncllm.config import EngineArgs
from asyncllm.engine.async_engine import AsyncLLMEngine
from asyncllm.engine.engine_client import EngineClient
from tests.gateway_helpers import WS, FakeEngine, run_server

ROOT = Path(__file__).resolve().parent.parent

# Heavy third-party packages are skipped: their stubs are not what is checked, and reading torch's
# would take minutes.
MYPY_INI = """
[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-torch.*,transformers.*,triton.*,safetensors.*,gguf.*,numpy.*,tokenizers.*,starlette.*,uvicorn.*,prometheus_client.*,websockets.*,hypothesis.*]
follow_imports = skip
"""


def test_both_engines_are_engine_clients():
    assert isinstance(FakeEngine(), EngineClient)
    assert isinstance(AsyncLLMEngine.from_engine_args(EngineArgs()), EngineClient)
    assert not isinstance(object(), EngineClient)
    from asyncllm.engine.data_parallel import DataParallelEngine

    assert isinstance(DataParallelEngine([FakeEngine(), FakeEngine()]), EngineClient)


def test_engine_client_use_type_checks(tmp_path):
    pytest.importorskip("mypy")
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_INI)
    files = [
        "tests/engine_client_typing.py",  # FakeEngine and AsyncLLMEngine as EngineClient
        "asyncllm/engine/engine_client.py",
        "asyncllm/engine/transports.py",
        "asyncllm/engine/data_parallel.py",
        "asyncllm/engine/dp_router.py",
        "asyncllm/engine/placement.py",
        "asyncllm/gateway/engine_io.py",  # the gateway's calls into the engine
        "asyncllm/gateway/app.py",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir",
         str(tmp_path / "cache"), *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_gateway_streams_through_the_stub_sink():
    """The gateway hands every EngineClient a sink on the WebSocket path (no supports_sink probe);
    the stub's outputs arrive through it, in order."""
    engine = FakeEngine(step_s=0.001)
    calls: list[bool] = []
    real = engine.generate

    def spy(*a, sink=None, **kw):
        calls.append(sink is not None)
        return real(*a, sink=sink, **kw)

    engine.generate = spy  # type: ignore[method-assign]
    with run_server(engine) as srv:
        ws = WS(srv.ws_url())
        ws.send({"type": "complete", "id": "a", "prompt": "hello", "params": {"max_tokens": 6}})
        ws.until_done(["a"])
        ws.close()
    from tests.gateway_helpers import fake_text

    assert ws.text("a") == fake_text([ord(c) for c in "hello"], 0, 6)
    assert calls == [True]
