"""API keys and origins. Pure functions over headers and query strings (Starlette's HTTPConnection
covers both HTTP requests and WebSocket upgrades)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection


def presented_key(conn: HTTPConnection) -> str | None:
    """The key the client sent: `Authorization: Bearer K`, else `?api_key=K` (browsers cannot set
    headers on a WebSocket upgrade)."""
    auth = conn.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = conn.query_params.get("api_key")
    return key or None


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


def _origin_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def origin_allowed(conn: HTTPConnection, allowed: Sequence[str]) -> bool:
    """Non-browser clients send no Origin and pass. A browser page may connect from its own origin
    (the chat page at /) or from one listed in `allowed` ("*" = any)."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    host = conn.headers.get("host", "").lower()
    _, netloc = _origin_of(origin)
    return bool(host) and netloc == host
