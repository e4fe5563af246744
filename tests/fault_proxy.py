"""FaultProxy: a TCP proxy on 127.0.0.1 that drops connections at chosen or random points.

It relays bytes between clients and an upstream server and, per connection, may cut the
connection after a byte budget in either direction: a small budget cuts the WebSocket handshake
(the HTTP upgrade is the first bytes each way), a larger one cuts mid-stream, possibly mid-frame.
It runs its own asyncio loop on a thread, so it serves tests under asyncio and trio alike.

    with FaultProxy(server_port, plan=random_plan(seed=1)) as proxy:
        url = proxy.url("/v1/ws")
        ...
        proxy.drop_all()          # cut every live connection now
        proxy.refusing = True     # an outage: accept and close at once
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Cut:
    """Close the connection once `down` bytes went server->client or `up` bytes client->server
    (None = no limit that way). Both sides are aborted (no close frame, no FIN handshake)."""

    down: int | None = None
    up: int | None = None


Plan = Callable[[int], Cut | None]  # connection number (0, 1, ...) -> its cut, if any


def no_faults(i: int) -> Cut | None:
    return None


def random_plan(
    seed: int = 0,
    p_handshake: float = 0.2,
    p_drop: float = 0.7,
    down: tuple[int, int] = (300, 4000),
) -> Plan:
    """Each connection: with p_handshake, cut inside the upgrade (either direction); else with
    p_drop, cut after a uniform number of server->client bytes in `down`; else leave it alone."""
    rng = random.Random(seed)

    def plan(i: int) -> Cut | None:
        r = rng.random()
        if r < p_handshake:
            if rng.random() < 0.5:
                return Cut(down=rng.randrange(0, 120))  # the 101 response is longer than this
            return Cut(up=rng.randrange(0, 100))  # the upgrade request is longer than this
        if r < p_handshake + p_drop:
            return Cut(down=rng.randint(*down))
        return None

    return plan


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        plan: Plan = no_faults,
    ):
        self.upstream = (upstream_host, upstream_port)
        self.plan = plan
        self.refusing = False
        self.port = 0
        # statistics (read from the test thread; ints are updated atomically enough)
        self.connections = 0
        self.cuts = 0
        self.handshake_cuts = 0  # cuts placed inside the upgrade by the plan
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        # live connections -> their state ({"frozen": bool})
        self._live: dict[tuple[asyncio.StreamWriter, asyncio.StreamWriter], dict] = {}
        self._ready = threading.Event()

    def url(self, path: str = "/v1/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_all(self) -> None:
        """Cut every live connection now (from the test's thread)."""
        loop = self._loop
        assert loop is not None
        asyncio.run_coroutine_threadsafe(self._drop_all(), loop).result(10)

    def freeze_all(self) -> None:
        """Every live connection goes silent both ways but stays open: a half-open socket (a
        NAT that forgot the flow, a dead peer) that only a keepalive can detect."""
        loop = self._loop
        assert loop is not None

        async def freeze() -> None:
            for state in self._live.values():
                state["frozen"] = True

        asyncio.run_coroutine_threadsafe(freeze(), loop).result(10)

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop_all()

    async def _drop_all(self) -> None:
        for cw, uw in list(self._live):
            self.cuts += 1
            _abort(cw)
            _abort(uw)
        self._live.clear()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        i = self.connections
        self.connections += 1
        if self.refusing:
            self.refused += 1
            _abort(cw)
            return
        cut = self.plan(i)
        if cut is not None and ((cut.down or 1 << 30) < 120 or (cut.up or 1 << 30) < 100):
            self.handshake_cuts += 1
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(cw)
            return
        pair = (cw, uw)
        state = {"frozen": False}
        self._live[pair] = state
        done = asyncio.Event()

        async def pump(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, budget: int | None
        ) -> None:
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    if state["frozen"]:
                        continue
                    if budget is not None and len(data) >= budget:
                        if budget:
                            w.write(data[:budget])
                            await w.drain()
                        self.cuts += 1
                        break
                    if budget is not None:
                        budget -= len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                done.set()

        tasks = [
            asyncio.ensure_future(pump(ur, cw, cut.down if cut else None)),
            asyncio.ensure_future(pump(cr, uw, cut.up if cut else None)),
        ]
        if cut is not None and cut.up == 0:
            self.cuts += 1
            done.set()
        await done.wait()
        # whichever way ended (budget, EOF, reset), end both ways at once: the point is a drop
        _abort(cw)
        _abort(uw)
        self._live.pop(pair, None)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _abort(w: asyncio.StreamWriter) -> None:
    try:
        w.transport.abort()
    except Exception:
        pass
