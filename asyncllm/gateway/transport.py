"""Below the ASGI app, in uvicorn's own HTTP protocol: what one unauthenticated client must not
be able to do with sockets alone.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but not a connection that never
sends a request, nor one that trickles its headers or body (slowloris): tens of thousands of them
exhaust the open-file limit, and then /health and every new handshake time out. So each
connection gets deadlines (request line and headers within `header_timeout`, the whole request
within `body_timeout`), and there are caps on open TCP connections, in all and per client IP, below
the fd limit, answered with a clean 503 instead of a failed accept(). What asyncio logs for a
failed accept() (a traceback per attempt) is rate-limited, and secrets in query strings never
reach uvicorn's log lines.

`protocol_class(limits)` is the `http=` class for `uvicorn.Config` (h11: the implementation
uvicorn picks when httptools is not installed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
import weakref
from dataclasses import dataclass
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# ---- secrets in log lines ---------------------------------------------------------------------

_SECRET_QUERY = re.compile(r"([?&](?:api(?:_|%5f)key|session|token)=)[^&\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    """`?api_key=K&session=S` -> `?api_key=[redacted]&session=[redacted]`."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """On uvicorn's loggers: the access line and the WebSocket "[accepted]" line carry the
    path with its query string, where browsers used to put the API key and the session."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(redact(a) if isinstance(a, str) and "=" in a else a for a in args)
        elif isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Idempotent; after uvicorn.Config has configured logging (dictConfig keeps filters)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in lg.filters):
            lg.addFilter(RedactSecrets())


# ---- rate-limited warnings --------------------------------------------------------------------


class RateLimitedLog:
    """At most one warning per `interval` seconds; the next one says how many were dropped."""

    def __init__(self, interval: float = 10.0, clock: Any = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = -float("inf")
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> bool:
        now = self.clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += f" (and {self.suppressed} more in the last {now - self._last:.0f} s)"
        self._last, self.suppressed = now, 0
        logger.warning(msg, *args)
        return True


ACCEPT_FAILURE = "socket.accept() out of system resource"
_patched_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def install_accept_log_limit(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """asyncio reports every failed accept() (EMFILE) through the loop's exception handler, with
    a traceback: at the fd limit that was 111 MB of log in 25 s. One line per interval instead."""
    if loop in _patched_loops:
        return
    _patched_loops.add(loop)
    previous = loop.get_exception_handler()
    limiter = RateLimitedLog(interval)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(ACCEPT_FAILURE):
            limiter.warning(
                "%s: %s (is the fd limit too low?)", ACCEPT_FAILURE, context.get("exception")
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


# ---- connection limits ------------------------------------------------------------------------

FD_RESERVE = 128  # descriptors kept for everything but client sockets (model files, pipes, logs)


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_tcp_connections() -> int:
    """Below the open-file limit, so the server itself can still open what it needs."""
    soft = fd_limit()
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(16, min(16384, soft - max(FD_RESERVE, soft // 8)))


@dataclass
class ConnectionLimits:
    header_timeout: float  # request line + headers, from connect (or the previous response)
    body_timeout: float  # the whole request, headers and body, from the same start
    max_connections: int  # open TCP connections (HTTP and WebSocket)
    max_per_ip: int  # of those, from one client address
    retry_after: int = 1


class ConnectionGuard:
    """Counts of one server's open connections (one event loop: no locks)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.expired = 0
        self._log = RateLimitedLog()

    def admit(self, ip: str) -> str | None:
        """None (and counted), or why the connection is refused."""
        lim = self.limits
        if self.open >= lim.max_connections:
            reason = f"too many open connections (limit {lim.max_connections})"
        elif self.per_ip.get(ip, 0) >= lim.max_per_ip:
            reason = f"too many open connections from {ip} (limit {lim.max_per_ip})"
        else:
            self.open += 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            return None
        self.refused += 1
        self._log.warning("refusing a connection: %s", reason)
        return reason

    def release(self, ip: str) -> None:
        self.open -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)


def _refusal(reason: str, retry_after: int) -> bytes:
    body = orjson.dumps(
        {"error": {"message": reason, "type": "server_error", "param": None, "code": "overloaded"}}
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {retry_after}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines per request and the guard's caps per connection."""

    guard: ConnectionGuard  # set on the subclass protocol_class() makes

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ip = ""
        self._admitted = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._start = 0.0
        install_accept_log_limit(self.loop)

    # ---- admission ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ip = self.client[0] if self.client else "?"
        reason = self.guard.admit(ip)
        if reason is not None:
            self._refused = True
            transport.write(_refusal(reason, self.guard.limits.retry_after))
            if transport.can_write_eof():
                transport.write_eof()  # the answer is read before the client's request lands
            self._timer = self.loop.call_later(1.0, transport.close)
            return
        self._ip, self._admitted = ip, True
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self.transport.close()
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.guard.release(self._ip)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # From here the transport belongs to the WebSocket protocol (its pings find dead peers);
        # the connection stays counted until that protocol hears the transport close.
        self._cancel_timer()
        super().handle_websocket_upgrade(event)
        ws = self.transport.get_protocol()
        if ws is not self:
            lost = ws.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                self._release()
                lost(exc)

            ws.connection_lost = connection_lost  # type: ignore[method-assign]

    # ---- deadlines ------------------------------------------------------------------------
    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            self._arm()  # the next request's headers (uvicorn's keep-alive timer may be first)

    def _arm(self) -> None:
        self._cancel_timer()
        self._start = self.loop.time()
        self._timer = self.loop.call_later(self.guard.limits.header_timeout, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        t = self.transport
        if t.is_closing() or t.get_protocol() is not self:
            return
        state = self.conn.their_state
        idle = self.cycle is None or self.cycle.response_complete
        if state is h11.IDLE and idle:
            self._expire("no complete request headers")
        elif state is h11.SEND_BODY:
            left = self._start + self.guard.limits.body_timeout - self.loop.time()
            if left > 0:
                self._timer = self.loop.call_later(left, self._check)
            else:
                self._expire("request body incomplete")
        # otherwise the request is in and its response is being produced: no deadline

    def _expire(self, why: str) -> None:
        self.guard.expired += 1
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("closing %s: %s in time", self.client, why)
        # Mid-body, the app sees a disconnect (and answers nobody); otherwise nothing runs.
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to one guard (uvicorn builds one instance per connection)."""
    guard = ConnectionGuard(limits)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
