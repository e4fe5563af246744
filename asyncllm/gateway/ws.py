"""WebSocket /v1/ws: many independent streams per socket, sessions that survive a dropped socket.

Per socket: a reader (parses frames, starts/cancels streams, queues resumes) and a single writer
(the only task that sends, so the order of frames is exactly the order they were numbered in).
Each pass of the writer takes every frame due at that moment; to a client that asked for
batches they go out as one message (per 64 KiB), so the per-message cost (ASGI, WebSocket
framing, a syscall) is paid per socket per engine step instead of per stream per token.
Streams run in the app's task group, not the socket's: a dropped socket leaves them generating
into their session until a resume re-attaches them or the TTL cancels them.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import aclosing
from typing import Any

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from asyncllm.gateway.auth import (
    authorized,
    browser_refusal,
    client_identity,
    key_id,
    offered_subprotocols,
    presented_key,
    presented_session,
)
from asyncllm.gateway.engine_io import EngineIO
from asyncllm.gateway.sessions import Session, SessionManager, Stream
from asyncllm.protocol import (
    BATCH_QUERY,
    CHAT,
    CLOSE_GOING_AWAY,
    CLOSE_OVERLOADED,
    CLOSE_SESSION_TAKEN,
    CLOSE_UNAUTHORIZED,
    COMPLETE,
    INTERNAL,
    OVERLOADED,
    SUBPROTOCOL,
    UNAUTHORIZED,
    CancelFrame,
    ChatFrame,
    CompleteFrame,
    ProtocolError,
    ResumeFrame,
    batch_messages,
    encode,
    error_frame,
    parse_client_frame,
    session_frame,
)
from asyncllm.tools import NONE, ToolCallStream

logger = logging.getLogger(__name__)

CONTROL_HIGH_WATER = 256  # queued control frames (errors, replays) before the reader pauses


class Connection:
    """One open socket: the writer side a session is attached to."""

    def __init__(self, ws: WebSocket, manager: SessionManager, batch: bool = False):
        self.ws = ws
        self.manager = manager
        self.batch = batch
        self.session: Session | None = None
        self.control: deque[Any] = deque()  # encoded frames and ("resume", id, after) items
        self.dirty: dict[Stream, None] = {}  # ordered set of streams with frames to take
        self._wakeup = anyio.Event()
        self._event_cls = type(self._wakeup)  # the backend's class: no lookup per wake-up
        self._drained: anyio.Event | None = None
        self.taken_over = False
        self.closing = False  # the server is shutting down: close (1001) once all is sent
        self.client: tuple[str, ...] = ()  # auth.client_identity: per-client limits

    # ---- Writer protocol (called by the session) ---------------------------------------------
    def wake(self, stream: Stream) -> None:
        self.dirty[stream] = None
        self._wakeup.set()

    def take_over(self) -> None:
        self.taken_over = True
        self._wakeup.set()

    def close_when_flushed(self) -> None:
        """Graceful shutdown: send what is due, then end the socket (the endpoint closes 1001)."""
        self.closing = True
        self._wakeup.set()

    # ---- queueing ------------------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        self.control.append(encode(frame))
        self._wakeup.set()

    def queue_resume(self, frame: ResumeFrame) -> None:
        self.control.append(("resume", frame.id, frame.after))
        self._wakeup.set()

    async def wait_drained(self) -> None:
        """Backpressure for the reader: a client that sends frames but never reads the answers
        (errors, replays) stops being read, instead of growing our queue without bound."""
        while len(self.control) > CONTROL_HIGH_WATER:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    # ---- the writer task -----------------------------------------------------------------------
    async def write_loop(self) -> None:
        ws = self.ws
        while True:
            await self._wakeup.wait()
            self._wakeup = self._event_cls()
            while (self.control or self.dirty) and not self.taken_over:
                frames, finished = self._take()
                if self.batch:
                    frames = batch_messages(frames)
                for data in frames:
                    await ws.send_text(data)
                sess = self.session
                if sess is not None:
                    for stream in finished:
                        sess.on_done_sent(stream)
            if self.taken_over:
                await ws.close(CLOSE_SESSION_TAKEN, "session resumed on another socket")
                return
            if self.closing:
                return

    def _take(self) -> tuple[list[str], list[Stream]]:
        """Every frame due now, in order (control frames and resumes first, then the streams
        that woke us), numbered now; and the streams whose done is among them."""
        out: list[str] = []
        finished: list[Stream] = []
        sess = self.session
        control = self.control
        while control:
            item = control.popleft()
            if isinstance(item, str):
                out.append(item)
            else:
                self._resume(item[1], item[2], out, finished)
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        dirty, self.dirty = self.dirty, {}
        if sess is None or sess.writer is not self:
            return out, finished
        for stream in dirty:
            if not stream.attached:
                continue
            was_done = stream.done_sent
            out.extend(stream.take_frames())
            if stream.done_sent and not was_done:
                finished.append(stream)
        return out, finished

    def _resume(self, id: Any, after: int, out: list[str], finished: list[Stream]) -> None:
        sess = self.session
        assert sess is not None
        try:
            stream, frames = self.manager.resume(sess, id, after)
        except ProtocolError as e:
            out.append(encode(e.frame()))
            return
        was_done = stream.done_sent
        out.extend(frames)
        # Live from here: whatever piled up while detached goes out coalesced, numbered next.
        out.extend(stream.take_frames())
        if stream.done_sent and not was_done:
            finished.append(stream)


class WebSocketGateway:
    """The /v1/ws endpoint of one app."""

    def __init__(self, io: EngineIO, manager: SessionManager):
        self.io = io
        self.manager = manager
        self.settings = io.settings
        self.task_group: anyio.abc.TaskGroup | None = None  # the app's, set by the lifespan

    async def endpoint(self, ws: WebSocket) -> None:
        s = self.settings
        if browser_refusal(ws, s.allowed_origins, s.served_hosts) is not None:
            await ws.close(code=1008)  # before accept: the upgrade gets HTTP 403, as over HTTP
            return
        # A page that carries its key in a subprotocol offers ours too; a browser fails the
        # handshake unless the server selects one of those offered.
        await ws.accept(
            subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(ws) else None
        )
        # Browsers cannot read an HTTP status from a failed upgrade, so refusals after the
        # handshake are an error frame and a close code.
        if not authorized(ws, s.api_keys):
            await self._refuse(ws, UNAUTHORIZED, "missing or wrong API key", CLOSE_UNAUTHORIZED)
            return
        limits = self.io.limits
        if not limits.open_connection():
            await self._refuse(
                ws,
                OVERLOADED,
                f"too many open sockets (limit {limits.max_connections})",
                CLOSE_OVERLOADED,
            )
            return
        client = client_identity(ws, s.api_keys)
        key_client = tuple(c for c in client if c.startswith("key:"))
        try:
            limits.key_sockets.acquire(key_client)
        except ProtocolError as e:
            limits.close_connection()
            await self._refuse(ws, OVERLOADED, e.message, CLOSE_OVERLOADED)
            return
        metrics = self.io.metrics
        metrics.open_sockets.inc()
        batch = ws.query_params.get(BATCH_QUERY, "").lower() in ("1", "true", "yes")
        conn = Connection(ws, self.manager, batch)
        conn.client = client
        key = presented_key(ws)
        owner = key_id(key) if key and s.api_keys else None
        sess, resumed = self.manager.attach_session(presented_session(ws), owner, conn)
        conn.session = sess
        try:
            # First and alone (never inside a batch: it says whether batches may follow), sent
            # before the writer exists, so nothing can overtake it.
            try:
                await ws.send_text(encode(session_frame(sess.key, s.resume_ttl, batch, resumed)))
            except (WebSocketDisconnect, RuntimeError, OSError):
                return
            async with anyio.create_task_group() as tg:

                async def write() -> None:
                    try:
                        await conn.write_loop()
                    except (WebSocketDisconnect, RuntimeError, OSError):
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(write)
                try:
                    await self._read_loop(ws, conn, sess)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.manager.detach(sess, conn)
            limits.key_sockets.release(key_client)
            limits.close_connection()
            metrics.open_sockets.dec()
            if ws.application_state == WebSocketState.CONNECTED and not conn.taken_over:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    try:
                        reason = "server shutting down" if conn.closing else ""
                        await ws.close(CLOSE_GOING_AWAY, reason)
                    except Exception:
                        pass

    async def _refuse(self, ws: WebSocket, code: str, message: str, close_code: int) -> None:
        try:
            await ws.send_text(encode(error_frame(None, code, message)))
            await ws.close(close_code, message[:120])
        except Exception:
            pass

    async def _read_loop(self, ws: WebSocket, conn: Connection, sess: Session) -> None:
        max_bytes = self.settings.max_frame_bytes
        while True:
            await conn.wait_drained()
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("text")
            if data is None:
                data = msg.get("bytes")
            try:
                frame = parse_client_frame(data, max_bytes)
            except ProtocolError as e:
                self._reject_frame(conn, sess, e)
                continue
            try:
                self._handle(conn, sess, frame)
            except ProtocolError as e:
                self.io.metrics.errors.labels("ws", e.code).inc()
                conn.send(e.frame())
            except Exception as e:  # a bug must cost one frame, not the socket
                logger.exception("error handling a frame")
                conn.send(error_frame(getattr(frame, "id", None), INTERNAL, f"internal error: {e}"))

    def _reject_frame(self, conn: Connection, sess: Session, e: ProtocolError) -> None:
        """A chat/complete frame with a readable, unused id still gets its done (finish_reason
        "error") after the error frame, so a client waits for exactly one done per stream."""
        self.io.metrics.errors.labels("ws", e.code).inc()
        if e.type in (CHAT, COMPLETE) and e.id is not None:
            stream = Stream(e.id, "", replay_limit=self.settings.replay_buffer_bytes)
            try:
                sess.add(stream)
            except ProtocolError as dup:
                conn.send(e.frame())
                conn.send(dup.frame())
                return
            stream.finish(error={"code": e.code, "message": e.message})
            sess.notify(stream)
        else:
            conn.send(e.frame())

    def _handle(self, conn: Connection, sess: Session, frame: Any) -> None:
        if isinstance(frame, (ChatFrame, CompleteFrame)):
            self._start(conn, sess, frame)
        elif isinstance(frame, CancelFrame):
            stream = sess.get(frame.id)
            if stream is None:
                raise ProtocolError("not_found", f"no stream {frame.id!r} to cancel", frame.id)
            stream.cancel()
        elif isinstance(frame, ResumeFrame):
            conn.queue_resume(frame)

    def _start(self, conn: Connection, sess: Session, frame: ChatFrame | CompleteFrame) -> None:
        io = self.io
        stream = Stream(
            frame.id,
            io.new_request_id("ws"),
            n=frame.params.n,
            return_token_ids=frame.params.return_token_ids,
            replay_limit=self.settings.replay_buffer_bytes,
        )
        gp = frame.params
        if isinstance(frame, ChatFrame) and gp.tools and gp.tool_choice != NONE:
            stream.tool_streams = [
                ToolCallStream(gp.tool_choice, io.tool_parser) for _ in range(gp.n)
            ]
        sess.add(stream)  # raises for an id in use: the running stream is untouched
        try:
            io.check_model(frame.model, frame.id)
            if sess.active() > self.settings.max_streams_per_connection:
                raise ProtocolError(
                    OVERLOADED,
                    f"too many open streams on this session "
                    f"(limit {self.settings.max_streams_per_connection})",
                    frame.id,
                )
            io.admit(frame.id, conn.client)
            params = io.sampling_params(frame.params, frame.id)
            assert self.task_group is not None, "the app's lifespan has not run"
        except ProtocolError as e:
            self.io.metrics.errors.labels("ws", e.code).inc()
            stream.finish(error={"code": e.code, "message": e.message})
            sess.notify(stream)
            return
        self.task_group.start_soon(self._run, sess, stream, frame, params, conn.client)

    async def _run(
        self, sess: Session, stream: Stream, frame: Any, params: Any, client: tuple[str, ...]
    ) -> None:
        io = self.io
        self.io.metrics.open_streams.inc()
        try:
            with anyio.CancelScope() as scope:
                stream.canceller = scope.cancel
                if stream.cancel_requested:
                    scope.cancel()
                try:
                    if isinstance(frame, ChatFrame):
                        tools = frame.params.tools if frame.params.tool_choice != NONE else None
                        ids = await io.encode(frame.messages, None, frame.id, tools)
                    else:
                        ids = await io.encode(None, frame.prompt, frame.id)
                    stream.prompt_tokens = len(ids)
                    io.admit(frame.id, client)

                    def on_pieces(pieces: list[Any]) -> None:
                        new = stream.add(pieces)
                        if None not in stream.finish_reasons:
                            # The request's last output: its done frame goes out with its last
                            # delta, in the writer's next pass, not one pass later when this
                            # task resumes (at a wave of finishes, a done sooner is a new
                            # request sooner: ops/bench/NOTES.md, "Serving, third round").
                            stream.finish()
                            new = True
                        if new:
                            sess.notify(stream)

                    # Pieces arrive by callback, in the engine's drain: no task switch per token.
                    gen = io.generate(
                        ids,
                        params,
                        frame.params.priority,
                        "ws",
                        stream.request_id,
                        frame.id,
                        on_pieces=on_pieces,
                        client=client,
                    )
                    async with aclosing(gen):
                        async for _ in gen:
                            pass
                except ProtocolError as e:
                    stream.finish(error={"code": e.code, "message": e.message})
                except Exception as e:
                    logger.exception("stream %r failed", stream.id)
                    stream.finish(error={"code": INTERNAL, "message": f"{type(e).__name__}: {e}"})
            stream.finish("cancelled" if scope.cancel_called else None)
            sess.notify(stream)
        finally:
            stream.canceller = None
            self.io.metrics.open_streams.dec()
