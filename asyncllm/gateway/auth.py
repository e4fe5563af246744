"""API keys and origins. Pure functions over headers and query strings (Starlette's HTTPConnection
covers both HTTP requests and WebSocket upgrades)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from asyncllm.protocol import KEY_SUBPROTOCOL, SESSION_HEADER, SESSION_SUBPROTOCOL


def offered_subprotocols(conn: HTTPConnection) -> list[str]:
    raw = conn.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _from_subprotocol(conn: HTTPConnection, prefix: str) -> str | None:
    for p in offered_subprotocols(conn):
        if p.startswith(prefix):
            return p[len(prefix) :]
    return None


def presented_key(conn: HTTPConnection) -> str | None:
    """The key the client sent: `Authorization: Bearer K`; from a browser's WebSocket (which
    cannot set headers) the `asyncllm.key.<base64url K>` subprotocol; last `?api_key=K`, kept
    for old pages (the access log redacts it)."""
    auth = conn.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    enc = _from_subprotocol(conn, KEY_SUBPROTOCOL)
    if enc:
        try:
            return base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return "\x00"  # malformed: a key that matches nothing
    key = conn.query_params.get("api_key")
    return key or None


def presented_session(conn: HTTPConnection) -> str | None:
    """The session a reconnecting client asks for: subprotocol, header, or `?session=`."""
    return (
        _from_subprotocol(conn, SESSION_SUBPROTOCOL)
        or conn.headers.get(SESSION_HEADER)
        or conn.query_params.get("session")
        or None
    )


def key_id(key: str) -> str:
    """A key's stand-in for bookkeeping (session owners, per-key counts): never the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def client_identity(conn: HTTPConnection, api_keys: Sequence[str]) -> tuple[str, ...]:
    """Who per-client limits count against: the client address, and the API key when the
    server has keys (several users behind one address, or one key used from many)."""
    out = []
    if conn.client is not None:
        out.append(f"ip:{conn.client.host}")
    key = presented_key(conn)
    if key and api_keys:
        out.append(f"key:{key_id(key)}")
    return tuple(out)


def key_ok(key: str | None, api_keys: Sequence[str]) -> bool:
    """True when no keys are configured, or `key` is one of them (compared in constant time)."""
    if not api_keys:
        return True
    if key is None:
        return False
    kb = key.encode()
    ok = False
    for k in api_keys:  # no early exit: the time taken does not tell which key nearly matched
        ok |= hmac.compare_digest(kb, k.encode())
    return ok


def authorized(conn: HTTPConnection, api_keys: Sequence[str]) -> bool:
    return key_ok(presented_key(conn), api_keys)


# Names a loopback-bound server answers to by default (DNS rebinding: a page on any site whose
# name the attacker re-points at 127.0.0.1 reaches us with its own name in the Host header).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_WS_SCHEMES = {"ws": "http", "wss": "https"}


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    return h in LOOPBACK_HOSTS or h.startswith("127.") or h.endswith(".localhost")


def _hostname(netloc: str) -> str:
    """`host[:port]` -> host, lower case; IPv6 `[::1]:8000` -> `::1`."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def host_allowed(host_header: str | None, allowed_hosts: Sequence[str]) -> bool:
    """`allowed_hosts`: exact names, `.example.com` for a domain and its subdomains, `*` = any.
    A request without Host (HTTP/1.0 tools) comes from no browser and passes."""
    if "*" in allowed_hosts or not host_header:
        return True
    name = _hostname(host_header)
    for a in allowed_hosts:
        if name == a or (a.startswith(".") and (name == a[1:] or name.endswith(a))):
            return True
    return False


def _origin_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def browser_refusal(
    conn: HTTPConnection, allowed_origins: Sequence[str], allowed_hosts: Sequence[str]
) -> str | None:
    """The one rule for HTTP requests and WebSocket upgrades alike: why a request is refused
    (answered 403 on both), or None.

    The Host header must be one this server answers to; that is what stops DNS rebinding, where
    the page's origin and the Host header agree because both are the attacker's name. Then a
    request without Origin (not a browser) passes; a browser page passes when its origin is
    listed (`*` = any) or is this server itself: same scheme (ws/wss count as http/https) and
    the same host and port as the Host header."""
    host = conn.headers.get("host")
    if not host_allowed(host, allowed_hosts):
        return f"host {_hostname(host or '')!r} is not served here (see --allowed-host)"
    origin = conn.headers.get("origin")
    if origin is None:
        return None
    origin = origin.rstrip("/")
    if "*" in allowed_origins or origin in allowed_origins:
        return None
    scheme, netloc = _origin_of(origin)
    own = conn.url.scheme.lower()
    own = _WS_SCHEMES.get(own, own)
    if host and scheme == own and netloc == host.lower():
        return None
    return "origin not allowed"
