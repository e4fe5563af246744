"""Every HTTP failure after admission answers OpenAI-shaped JSON with the right status (never
Starlette's plain-text 500), and the smaller HTTP edges: 405 and 415 bodies, a client that
disconnects mid-body, /metrics after the engine died."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import FakeEngine, run_server

MSG = [{"role": "user", "content": "hello"}]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    return err


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    """The real engine with a small KV cache (8 blocks of 16 tokens)."""
    from asyncllm import AsyncLLMEngine, EngineArgs

    args = EngineArgs(model=tiny_model_dir, num_kv_blocks=8, block_size=16, max_model_len=256)
    with run_server(AsyncLLMEngine.from_engine_args(args)) as srv:
        yield srv


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stop_token_ids_outside_vocab_is_400_json(real, path):
    body = {"stop_token_ids": [10**6], "max_tokens": 4}
    body.update({"messages": MSG} if "chat" in path else {"prompt": "hello"})
    r = httpx.post(real.http + path, json=body, timeout=30)
    err = assert_openai_error(r, 400, "invalid_request")
    assert "stop_token_ids" in err["message"]


def test_n_times_max_tokens_over_kv_cache_is_400_json(real):
    body = {"messages": MSG, "n": 4, "max_tokens": 100, "ignore_eos": True}
    r = httpx.post(real.http + "/v1/chat/completions", json=body, timeout=30)
    err = assert_openai_error(r, 400, "invalid_request")
    assert "KV" in err["message"]
    # and the server is fine afterwards
    ok = httpx.post(real.http + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_engine_dying_mid_request_is_503_json_with_retry_after():
    engine = FakeEngine(step_s=0.01)
    with run_server(engine, GatewaySettings(retry_after=3)) as srv:

        def kill_when_running() -> None:  # after admission, mid-generation
            deadline = time.monotonic() + 20
            while not engine.active and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)
            engine.errored = True

        threading.Thread(target=kill_when_running, daemon=True).start()
        body = {"messages": MSG, "max_tokens": 200}
        r = httpx.post(srv.http + "/v1/chat/completions", json=body, timeout=30)
        assert_openai_error(r, 503, "internal")
        assert r.headers["retry-after"] == "3"


def test_unexpected_exception_is_500_json(caplog):
    engine = FakeEngine()

    async def broken(*a, **kw):
        raise KeyError("bug")
        yield  # pragma: no cover

    with run_server(engine) as srv:
        engine.generate = broken  # a bug below the gateway: not a ValueError, engine alive
        with caplog.at_level(logging.ERROR):
            r = httpx.post(srv.http + "/v1/chat/completions", json={"messages": MSG}, timeout=30)
        assert_openai_error(r, 500, "internal")


def test_405_body_is_a_client_error():
    with run_server(FakeEngine()) as srv:
        r = httpx.get(srv.http + "/v1/chat/completions")
        err = assert_openai_error(r, 405, "invalid_request")
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_non_json_content_type_is_415(ctype):
    """A browser posts these cross-origin without a CORS preflight: they must not be parsed."""
    with run_server(FakeEngine()) as srv:
        data = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = httpx.post(srv.http + path, content=data, headers={"content-type": ctype})
            assert_openai_error(r, 415, "invalid_request")
        ok = httpx.post(
            srv.http + "/v1/chat/completions",
            content=data,
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert ok.status_code == 200, ok.text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_client_disconnect_mid_body_logs_no_traceback():
    rec = _Records()
    with run_server(FakeEngine()) as srv:
        # uvicorn's loggers do not propagate to the root logger that caplog watches
        logging.getLogger("uvicorn.error").addHandler(rec)
        try:
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"mess'
                )
                time.sleep(0.1)
                s.close()
            time.sleep(0.3)
            # the server still answers
            r = httpx.post(srv.http + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status_code == 200
        finally:
            logging.getLogger("uvicorn.error").removeHandler(rec)
    bad = [r for r in rec.records if r.exc_info or "ClientDisconnect" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def test_metrics_after_engine_death_report_no_load():
    engine = FakeEngine(step_s=0.05)
    with run_server(engine) as srv:
        engine.active.update({"x", "y"})  # two running requests when it dies
        before = httpx.get(srv.http + "/metrics").text
        assert "asyncllm_num_requests_running 2.0" in before
        engine.errored = True
        after = httpx.get(srv.http + "/metrics").text
        assert "asyncllm_engine_alive 0.0" in after
        assert "asyncllm_num_requests_running 0.0" in after, after
        assert "asyncllm_kv_blocks_used 0.0" in after
