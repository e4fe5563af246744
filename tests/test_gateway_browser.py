"""Browser-facing checks, one rule for HTTP and WebSocket: the Host allow-list (DNS rebinding),
the same-origin comparison with schemes, and secrets kept out of the access log."""

from __future__ import annotations

import base64
import logging
import os
import socket
import time

import httpx
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import WS, FakeEngine, run_server

BODY = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


def _status(port: int, request: bytes) -> int:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(request)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise AssertionError(f"closed without a status line: {buf!r}")
            buf += chunk
        return int(buf.split()[1])
    finally:
        s.close()


def http_status(port: int, host: str, origin: str | None) -> int:
    """POST /v1/chat/completions with this Host and Origin (a hand-made request: clients
    normally derive Host from the URL)."""
    o = f"Origin: {origin}\r\n" if origin else ""
    return _status(
        port,
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{o}"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + BODY,
    )


def ws_status(port: int, host: str, origin: str | None) -> int:
    """The status of a WebSocket upgrade with this Host and Origin (101 = accepted)."""
    o = f"Origin: {origin}\r\n" if origin else ""
    key = base64.b64encode(os.urandom(16)).decode()
    return _status(
        port,
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\n{o}Upgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
    )


def both(port: int, host: str, origin: str | None) -> tuple[int, int]:
    h = http_status(port, host, origin)
    w = ws_status(port, host, origin)
    return h, 101 if w == 101 else w


@pytest.fixture(scope="module")
def srv():
    with run_server(FakeEngine(), GatewaySettings()) as s:  # loopback, no keys
        yield s


def test_dns_rebinding_shape_refused_by_both(srv):
    """A page at http://evil.example:PORT whose name now resolves to 127.0.0.1: its Origin and
    the Host header agree, which the old same-origin check took as the server's own page."""
    evil = f"evil.example:{srv.port}"
    assert both(srv.port, evil, f"http://{evil}") == (403, 403)
    # a same-origin GET sends no Origin at all: the Host check alone must catch it
    assert both(srv.port, evil, None) == (403, 403)


def test_own_origin_accepted_by_both(srv):
    for name in ("127.0.0.1", "localhost"):
        own = f"{name}:{srv.port}"
        assert both(srv.port, own, f"http://{own}") == (200, 101)
    assert both(srv.port, f"[::1]:{srv.port}", None) == (200, 101)
    assert both(srv.port, f"127.0.0.1:{srv.port}", None) == (200, 101)  # not a browser


def test_scheme_and_port_are_compared_by_both(srv):
    own = f"127.0.0.1:{srv.port}"
    assert both(srv.port, own, f"https://{own}") == (403, 403)
    assert both(srv.port, own, f"http://127.0.0.1:{srv.port + 1}") == (403, 403)
    assert both(srv.port, own, "null") == (403, 403)


def test_allowed_host_and_origin_settings():
    s = GatewaySettings(allowed_hosts=("evil.example", ".corp.example"))
    with run_server(FakeEngine(), s) as srv:
        evil = f"evil.example:{srv.port}"
        assert both(srv.port, evil, f"http://{evil}") == (200, 101)
        sub = f"llm.corp.example:{srv.port}"
        assert both(srv.port, sub, f"http://{sub}") == (200, 101)
        other = f"corp.example.evil:{srv.port}"
        assert both(srv.port, other, None) == (403, 403)
        # listed origins are still needed for other sites' pages
        assert both(srv.port, evil, "https://app.example") == (403, 403)


def test_served_hosts_defaults():
    assert set(GatewaySettings(host="127.0.0.1").served_hosts) >= {"localhost", "127.0.0.1"}
    assert GatewaySettings(host="::1").served_hosts == GatewaySettings().served_hosts
    assert GatewaySettings(host="0.0.0.0").served_hosts == ("*",)
    assert GatewaySettings(host="0.0.0.0", allowed_hosts=("a.b",)).served_hosts == ("a.b",)
    with pytest.raises(ValueError):
        GatewaySettings(allowed_hosts=("http://x/",))


def test_health_and_page_need_no_host_check(srv):
    r = httpx.get(srv.http + "/health", headers={"Host": "evil.example"})
    assert r.status_code == 200


# ---- secrets --------------------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_access_log_redacts_api_key_and_session():
    s = GatewaySettings(api_keys=("sk-secret-1",))
    with run_server(FakeEngine(), s) as srv:
        loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
        cap = _Lines()
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.INFO)
            lg.addHandler(cap)
        try:
            r = httpx.get(srv.http + "/v1/models?api_key=sk-secret-1&session=sess-secret-2")
            assert r.status_code == 200
            WS(srv.ws_url("api_key=sk-secret-1&session=sess-secret-2&batch=1")).close()
            time.sleep(0.2)
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.removeHandler(cap)
                lg.setLevel(lv)
    text = "\n".join(cap.lines)
    assert "/v1/models?" in text and "WebSocket /v1/ws?" in text, text  # the lines are there
    assert "sk-secret-1" not in text and "sess-secret-2" not in text, text
    assert "api_key=[redacted]" in text and "batch=1" in text


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def test_key_and_session_in_subprotocols():
    """What the chat page does: no secret in the URL; the server selects asyncllm.v1."""
    with run_server(FakeEngine(), GatewaySettings(api_keys=("k/ü+1",), resume_ttl=5)) as srv:
        ws = WS(srv.ws_url(), subprotocols=["asyncllm.v1", "asyncllm.key." + _b64("k/ü+1")])
        assert ws.conn.subprotocol == "asyncllm.v1"
        key = ws.session["session"]
        ws.send({"type": "complete", "id": 1, "prompt": "ab", "params": {"max_tokens": 300}})
        ws.until(lambda f: f["type"] == "delta")
        ws.close()
        protos = ["asyncllm.v1", "asyncllm.key." + _b64("k/ü+1"), "asyncllm.session." + key]
        ws2 = WS(srv.ws_url(), subprotocols=protos)
        assert ws2.session["session"] == key  # resumed by the subprotocol alone
        ws2.close()
        with pytest.raises(AssertionError, match="unauthorized"):  # an error frame, not a session
            WS(srv.ws_url(), subprotocols=["asyncllm.v1", "asyncllm.key." + _b64("nope")])


def test_session_header_and_no_takeover_by_session_key_alone():
    s = GatewaySettings(api_keys=("alice", "bob"), resume_ttl=5)
    with run_server(FakeEngine(), s) as srv:
        a = WS(srv.ws_url(), additional_headers={"Authorization": "Bearer alice"})
        key = a.session["session"]
        a.send({"type": "complete", "id": 1, "prompt": "ab", "params": {"max_tokens": 300}})
        a.until(lambda f: f["type"] == "delta")
        # bob knows alice's session key (say from an old log line): he gets a session of his own
        b = WS(
            srv.ws_url(),
            additional_headers={"Authorization": "Bearer bob", "X-Asyncllm-Session": key},
        )
        assert b.session["session"] != key
        assert a.until(lambda f: f["type"] == "delta")  # alice's socket was not taken over
        b.close()
        a.close()
        # alice herself resumes with the header
        a2 = WS(
            srv.ws_url(),
            additional_headers={"Authorization": "Bearer alice", "X-Asyncllm-Session": key},
        )
        assert a2.session["session"] == key
        a2.close()
