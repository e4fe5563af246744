"""A minimal WebSocket client on anyio byte streams, driven by websockets' sans-I/O protocol.

Why not `websockets.asyncio.client`: it runs only under asyncio, and the client must behave the same
under trio. Bridging a helper thread's asyncio loop would give trio users a second event loop,
thread hops on every frame and two sets of cancellation semantics. websockets' `ClientProtocol` is
I/O-free (it parses and builds bytes, we move them), so one code path on `anyio.connect_tcp`
serves both backends, and every frame rule (masking, fragmentation, ping/pong, close handshake,
size limits) is still websockets' own, well-tested code.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import anyio
import anyio.abc
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri


class WSClosed(Exception):
    """The connection ended (EOF, reset, close frame or timeout). `code` is the close code the
    server sent, when it sent one."""

    def __init__(self, reason: str, code: int | None = None):
        super().__init__(reason if code is None else f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


@dataclass
class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    status: int
    headers: dict[str, str]
    body: bytes

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.body[:200].decode('utf-8', 'replace')}"


class WSConnection:
    """One open WebSocket. `send_text` and `recv` may run in different tasks; sends are serialised
    by a lock (pongs queued by the protocol go out through the same path)."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: ClientProtocol):
        self._stream = stream
        self._protocol = protocol
        self._send_lock = anyio.Lock()
        self._pending: list[str] = []  # messages parsed but not yet handed out
        self._fragments: list[bytes] = []
        self._pong = anyio.Event()
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10.0,
        max_size: int | None = 1 << 24,
        ssl_context: ssl.SSLContext | None = None,
    ) -> WSConnection:
        """TCP (+TLS for wss://) then the HTTP upgrade, within `timeout` seconds. Raises OSError,
        TimeoutError, WSClosed (dropped mid-handshake) or HandshakeRejected."""
        uri = parse_uri(url)
        protocol = ClientProtocol(uri, max_size=max_size)
        with anyio.fail_after(timeout):
            if uri.secure:
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                    uri.host,
                    uri.port,
                    tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(uri.host, uri.port)
            conn = cls(stream, protocol)
            try:
                request = protocol.connect()
                for k, v in (headers or {}).items():
                    request.headers[k] = v
                protocol.send_request(request)
                await conn._flush()
                await conn._handshake()
            except BaseException:
                await conn.abort()
                raise
        return conn

    async def _handshake(self) -> None:
        while True:
            data = await self._receive_bytes()
            if data is None:
                self._protocol.receive_eof()
            else:
                self._protocol.receive_data(data)
            response: Response | None = None
            for ev in self._protocol.events_received():
                if isinstance(ev, Response):
                    response = ev
                else:
                    self._take_frame(ev)
            exc = self._protocol.handshake_exc
            if exc is not None:
                if isinstance(exc, InvalidStatus):
                    r = exc.response
                    raise HandshakeRejected(
                        r.status_code, {k.lower(): v for k, v in r.headers.raw_items()}, r.body
                    )
                raise WSClosed(f"handshake failed: {exc}")
            if response is not None:
                return
            if data is None:
                raise WSClosed("connection closed during the handshake")

    async def _receive_bytes(self) -> bytes | None:
        try:
            return await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return None

    async def _flush(self) -> None:
        async with self._send_lock:
            for chunk in self._protocol.data_to_send():
                if chunk:
                    try:
                        await self._stream.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
                        raise WSClosed(f"send failed: {type(e).__name__}") from None
                else:  # b"" = half-close our side
                    try:
                        await self._stream.send_eof()
                    except Exception:
                        pass

    def _take_frame(self, frame) -> None:
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            self._fragments = [frame.data]
        elif op is Opcode.CONT:
            self._fragments.append(frame.data)
        elif op is Opcode.PONG:
            self._pong.set()
            return
        else:  # PING (answered by the protocol), CLOSE (seen through the state)
            return
        if frame.fin:
            data = b"".join(self._fragments)
            self._fragments = []
            self._pending.append(data.decode("utf-8") if isinstance(data, bytes) else data)

    async def recv(self) -> str:
        """The next text message. Raises WSClosed when the connection ends."""
        while not self._pending:
            if self._closed:
                raise WSClosed("connection closed")
            data = await self._receive_bytes()
            if data is None:
                self._protocol.receive_eof()
            else:
                self._protocol.receive_data(data)
            for ev in self._protocol.events_received():
                self._take_frame(ev)
            try:
                await self._flush()  # pongs, and the close frame echo
            except WSClosed:
                pass
            if self._pending:
                break
            if data is None or self._protocol.close_code is not None:
                self._closed = True
                code = self._protocol.close_code
                reason = self._protocol.close_reason or "connection closed"
                raise WSClosed(reason, code if code not in (None, 1006) else None)
        return self._pending.pop(0)

    async def send_text(self, text: str) -> None:
        if self._closed:
            raise WSClosed("connection closed")
        try:
            self._protocol.send_text(text.encode())
        except Exception as e:  # InvalidState: closing
            raise WSClosed(f"cannot send: {e}") from None
        await self._flush()

    async def ping(self, timeout: float) -> None:
        """Send a ping and wait for its pong; raise WSClosed when none comes within `timeout`."""
        self._pong = anyio.Event()
        try:
            self._protocol.send_ping(b"k")
        except Exception as e:
            raise WSClosed(f"cannot ping: {e}") from None
        await self._flush()
        with anyio.move_on_after(timeout):
            await self._pong.wait()
            return
        raise WSClosed(f"no pong within {timeout} s")

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """Close handshake (best effort, bounded by `timeout`), then the TCP stream."""
        with anyio.move_on_after(timeout, shield=True):
            if not self._closed:
                self._closed = True
                try:
                    self._protocol.send_close(code)
                    await self._flush()
                    # the server answers with its close frame, then ends TCP
                    while True:
                        data = await self._receive_bytes()
                        if data is None:
                            break
                        self._protocol.receive_data(data)
                        self._protocol.events_received()
                except Exception:
                    pass
        await self.abort()

    async def abort(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except Exception:
                pass
