"""Admission limits: sizes, queue length, open sockets. Past a limit the answer is an error with
the matching code (too_large, overloaded), never a crash and never unbounded memory."""

from __future__ import annotations

from asyncllm.protocol import INTERNAL, OVERLOADED, TOO_LARGE, ProtocolError, StreamId

# The HTTP status each protocol error code maps to.
HTTP_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "too_large": 413,
    "overloaded": 429,
    "internal": 500,
}


class GatewayError(ProtocolError):
    """A protocol error with the HTTP status to answer with (and Retry-After, when to retry)."""

    def __init__(
        self,
        code: str,
        message: str,
        id: StreamId | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(code, message, id)
        self.status = status or HTTP_STATUS[code]
        self.retry_after = retry_after


def as_gateway_error(e: ProtocolError) -> GatewayError:
    if isinstance(e, GatewayError):
        return e
    return GatewayError(e.code, e.message, e.id)


class ClientCounts:
    """Open things (streams, sockets) per client identity ("ip:..." and "key:..." strings): one
    client cannot take all of a server's capacity."""

    def __init__(self, limit: int, what: str, retry_after: int):
        self.limit = limit
        self.what = what
        self.retry_after = retry_after
        self.counts: dict[str, int] = {}

    def check(self, clients: tuple[str, ...], id: StreamId | None = None) -> None:
        for c in clients:
            if self.counts.get(c, 0) >= self.limit:
                kind = "API key" if c.startswith("key:") else "client address"
                raise GatewayError(
                    OVERLOADED,
                    f"too many {self.what} for this {kind} (limit {self.limit}); retry shortly",
                    id,
                    retry_after=self.retry_after,
                )

    def acquire(self, clients: tuple[str, ...], id: StreamId | None = None) -> None:
        self.check(clients, id)
        for c in clients:
            self.counts[c] = self.counts.get(c, 0) + 1

    def release(self, clients: tuple[str, ...]) -> None:
        for c in clients:
            n = self.counts.get(c, 0) - 1
            if n > 0:
                self.counts[c] = n
            else:
                self.counts.pop(c, None)


class Limits:
    """Counters shared by the WebSocket and HTTP sides of one app (one event loop: no locks)."""

    def __init__(
        self,
        max_connections: int,
        max_queue: int,
        max_prompt_tokens: int,
        retry_after: int,
        max_streams_per_client: int = 1 << 30,
        max_sockets_per_key: int = 1 << 30,
    ):
        self.max_connections = max_connections
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.retry_after = retry_after
        self.connections = 0
        self.queued = 0  # admitted, no first token yet: the queue a new request would join
        self.client_streams = ClientCounts(
            max_streams_per_client, "unfinished requests", retry_after
        )
        self.key_sockets = ClientCounts(max_sockets_per_key, "open sockets", retry_after)

    def open_connection(self) -> bool:
        if self.connections >= self.max_connections:
            return False
        self.connections += 1
        return True

    def close_connection(self) -> None:
        self.connections -= 1

    def check_prompt(self, num_tokens: int, id: StreamId | None = None) -> None:
        if num_tokens > self.max_prompt_tokens:
            raise GatewayError(
                TOO_LARGE,
                f"prompt is {num_tokens} tokens; this server takes at most "
                f"{self.max_prompt_tokens}",
                id,
            )

    def check_queue(self, id: StreamId | None = None) -> None:
        if self.queued >= self.max_queue:
            raise GatewayError(
                OVERLOADED,
                f"{self.queued} requests are queued (limit {self.max_queue}); retry shortly",
                id,
                retry_after=self.retry_after,
            )


def engine_dead_error(id: StreamId | None = None, retry_after: int = 1) -> GatewayError:
    return GatewayError(
        INTERNAL, "the engine has stopped; see /health", id, status=503, retry_after=retry_after
    )
