"""Graceful shutdown (Ctrl-C / SIGTERM under `asyncllm serve`), within `--shutdown-timeout`.

uvicorn's own shutdown fails every WebSocket at once (close 1012) and then waits for HTTP
responses, up to its timeout, before cancelling them: a client saw a dropped connection, and a
long stream cost the whole timeout and an ASGI traceback. `GatewayServer` drains the gateway
first, once the listening sockets are closed:

1. nothing new is admitted (an answer of `shutting_down`, HTTP 503 with Retry-After);
2. every running request is aborted in the engine and its stream ends with an `error` frame
   of code `shutting_down` and its `done` (WebSocket), or an error event and `data: [DONE]` (SSE);
3. once each socket's writer has sent those frames, the socket is closed with 1001 (going away).

uvicorn's shutdown then finds the responses finished and the sockets gone, and the lifespan
shuts the engine down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import uvicorn

from asyncllm.gateway.engine_io import EngineIO
from asyncllm.gateway.sessions import SessionManager

logger = logging.getLogger(__name__)

Drain = Callable[[], Awaitable[None]]


def make_drain(io: EngineIO, manager: SessionManager) -> Drain:
    async def drain() -> None:
        await io.stop_generations()
        # WebSocket streams finish in their own tasks once their request has ended (or at once,
        # for those that never reached the engine): wait for each to be finished.
        while manager.open_streams() or io.live_requests:
            await anyio.sleep(0.01)
        for sess in list(manager.sessions.values()):
            if sess.writer is not None:
                sess.writer.close_when_flushed()
        while io.limits.connections:
            await anyio.sleep(0.01)

    return drain


class GatewayServer(uvicorn.Server):
    """uvicorn.Server that drains the gateway (`drain`) before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain | None = None):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: Any = None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        if self.drain is not None and not self.force_exit:
            t0 = time.monotonic()
            for server in self.servers:  # stop accepting first (uvicorn closes them again)
                server.close()
            logger.info("shutting down: ending open streams")
            with anyio.move_on_after(timeout) as scope:
                await self.drain()
            if scope.cancelled_caught:
                logger.warning("open streams did not end within %.1f s", timeout)
            if timeout is not None:
                # what is left of the budget for uvicorn's own wait
                self.config.timeout_graceful_shutdown = max(0.1, timeout - (time.monotonic() - t0))
        await super().shutdown(sockets)
