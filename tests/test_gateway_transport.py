"""Idle and slowloris connections, connection caps and refusals, the accept-failure log: the
TCP-level guard in uvicorn's protocol (asyncllm.gateway.transport). Loopback only, every loop
bounded by a deadline."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import httpx
import orjson
import pytest

from asyncllm.gateway import GatewaySettings
from asyncllm.gateway.transport import (
    ACCEPT_FAILURE,
    default_max_tcp_connections,
    fd_limit,
    install_accept_log_limit,
)
from tests.gateway_helpers import WS, FakeEngine, run_server

FAST = dict(header_timeout=0.5, body_timeout=1.0, keep_alive_timeout=0.5)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `s` (EOF or reset), reading whatever it sends; None
    if it is still open after `seconds`."""
    t0 = time.monotonic()
    s.settimeout(0.05)
    while time.monotonic() - t0 < seconds:
        try:
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:  # reset
            return time.monotonic() - t0
    return None


def trickle_until_closed(s: socket.socket, data: bytes, seconds: float) -> float | None:
    """Send `data` one byte per 50 ms; seconds until the server closed the connection."""
    t0 = time.monotonic()
    s.settimeout(0.05)
    for i in range(int(seconds / 0.05)):
        try:
            s.sendall(data[i % len(data) : i % len(data) + 1])
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


@pytest.fixture(scope="module")
def srv():
    with run_server(FakeEngine(step_s=0.05), GatewaySettings(**FAST)) as s:
        yield s


def test_connections_that_never_send_are_closed(srv):
    socks = [connect(srv.port) for _ in range(5)]
    try:
        for s in socks:
            t = closed_within(s, 5)
            assert t is not None and t < 3, "an idle connection was never closed"
    finally:
        for s in socks:
            s.close()


def test_header_trickle_is_closed(srv):
    s = connect(srv.port)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t = trickle_until_closed(s, b"X-Slow: yes\r\n", 5)
        assert t is not None and t < 3, "headers trickled forever"
    finally:
        s.close()


def test_body_trickle_is_closed(srv):
    s = connect(srv.port)
    try:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        t = trickle_until_closed(s, b'{"messages": ', 6)
        assert t is not None and t < 3, "a body trickled forever"
    finally:
        s.close()
    assert httpx.get(srv.http + "/health").status_code == 200


def test_keep_alive_then_silence_is_closed(srv):
    s = connect(srv.port)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")  # a second request that never completes
        t = closed_within(s, 5)
        assert t is not None and t < 3
    finally:
        s.close()


def test_long_responses_are_not_cut(srv):
    """The deadlines are for receiving a request: a stream longer than body_timeout goes on."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 40, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", srv.http + "/v1/chat/completions", json=body, timeout=20) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert time.monotonic() - t0 > FAST["body_timeout"]
    assert lines[-1] == "data: [DONE]"
    # and a WebSocket that stays quiet longer than the header timeout is still open
    ws = WS(srv.ws_url())
    time.sleep(1.2)
    ws.send({"type": "complete", "id": 1, "prompt": "ab", "params": {"max_tokens": 2}})
    ws.until_done([1])
    ws.close()


def test_connection_cap_refuses_cleanly_and_recovers():
    s = GatewaySettings(max_tcp_connections=4, **FAST)
    with run_server(FakeEngine(), s) as srv:
        idle = [connect(srv.port) for _ in range(4)]
        try:
            time.sleep(0.1)
            extra = connect(srv.port)
            head = extra.recv(65536)
            extra.close()
            assert head.startswith(b"HTTP/1.1 503"), head
            status, _, rest = head.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in status.lower()
            assert orjson.loads(rest)["error"]["code"] == "overloaded"
        finally:
            for c in idle:
                c.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if httpx.get(srv.http + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("/health did not come back after the idle sockets closed")


def test_per_ip_cap_and_websockets_are_counted_until_they_close():
    s = GatewaySettings(max_connections_per_client=3, **FAST)
    with run_server(FakeEngine(), s) as srv:
        a, b = WS(srv.ws_url()), WS(srv.ws_url())
        c = connect(srv.port)
        extra = connect(srv.port)
        assert extra.recv(65536).startswith(b"HTTP/1.1 503")
        extra.close()
        c.close()
        a.close()
        b.close()
        deadline = time.monotonic() + 5
        while srv.server.config.http.guard.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.config.http.guard.open == 0  # the WebSockets were released
        three = [WS(srv.ws_url()) for _ in range(3)]
        for w in three:
            w.close()


def test_default_cap_is_below_the_fd_limit():
    assert default_max_tcp_connections() < fd_limit()
    assert default_max_tcp_connections() >= 16


def test_accept_failures_are_logged_at_most_once_per_interval(caplog):
    loop = asyncio.new_event_loop()
    try:
        install_accept_log_limit(loop, interval=60)
        with caplog.at_level(logging.WARNING, logger="asyncllm.gateway.transport"):
            for _ in range(1000):
                loop.call_exception_handler(
                    {"message": ACCEPT_FAILURE, "exception": OSError(24, "Too many open files")}
                )
        lines = [r for r in caplog.records if ACCEPT_FAILURE in r.getMessage()]
        assert len(lines) == 1 and not lines[0].exc_info
        # other loop errors still reach the default handler
        with caplog.at_level(logging.ERROR):
            loop.call_exception_handler({"message": "something else"})
        assert any("something else" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()


def test_timeouts_validated():
    with pytest.raises(ValueError):
        GatewaySettings(header_timeout=0)
    with pytest.raises(ValueError):
        GatewaySettings(header_timeout=5, body_timeout=1)
    with pytest.raises(ValueError):
        GatewaySettings(max_tcp_connections=0)


def test_streams_per_client_are_capped_over_ws_and_http():
    s = GatewaySettings(max_streams_per_client=2)
    with run_server(FakeEngine(step_s=0.01), s) as srv:
        ws = WS(srv.ws_url())
        for i in (1, 2):
            ws.send({"type": "complete", "id": i, "prompt": "ab", "params": {"max_tokens": 500}})
        ws.until(lambda f: f["type"] == "delta" and f["id"] == 2)
        ws.send({"type": "complete", "id": 3, "prompt": "ab", "params": {"max_tokens": 5}})
        err = ws.until(lambda f: f["type"] == "error" and f["id"] == 3)
        assert err["code"] == "overloaded"
        r = httpx.post(
            srv.http + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=10
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        ws.send({"type": "cancel", "id": 1})
        ws.until_done([1])
        time.sleep(0.1)
        r = httpx.post(srv.http + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200  # the slot came back
        ws.send({"type": "cancel", "id": 2})
        ws.until_done([2])
        ws.close()


def _ws_from(srv, source_ip: str, **kw) -> WS:
    """A WebSocket from another loopback address (all of 127/8 is the loopback interface)."""
    sock = socket.create_connection(
        ("127.0.0.1", srv.port), timeout=5, source_address=(source_ip, 0)
    )
    return WS(srv.ws_url(), sock=sock, **kw)


def test_sockets_per_api_key_are_capped_across_addresses():
    s = GatewaySettings(api_keys=("k1", "k2"), max_connections_per_client=2)
    with run_server(FakeEngine(), s) as srv:
        auth = {"additional_headers": {"Authorization": "Bearer k1"}}
        a = _ws_from(srv, "127.0.0.2", **auth)
        b = _ws_from(srv, "127.0.0.3", **auth)
        with pytest.raises(AssertionError, match="overloaded"):
            _ws_from(srv, "127.0.0.4", **auth)
        other = _ws_from(srv, "127.0.0.4", additional_headers={"Authorization": "Bearer k2"})
        for w in (a, b, other):
            w.close()
