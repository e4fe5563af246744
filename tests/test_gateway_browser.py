"""Browser-facing checks, one rule for HTTP and WebSocket: the Host allow-list (DNS rebinding),
the same-origin comparison with schemes, and secrets kept out of the access log."""

from __future__ import annotations

import base64
import os
import socket

import httpx
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import FakeEngine, run_server

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
