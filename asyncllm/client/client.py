"""Client: every chat of the client multiplexed over one WebSocket (protocol v1, `/v1/ws`), with
reconnect, session resume and exactly-once delivery of deltas.

How a flaky network is hidden:
- One supervisor task owns the socket. When it drops, it reconnects with capped exponential
  backoff and full jitter (tenacity), asking for session K in the `X-Asyncllm-Session` header
  (not the URL: a secret). The first connection presents a random key of ours (a proposal the
  server adopts): a proxy that routes by session key (ops/deploy/nginx hashes on the header,
  else the subprotocol or `?session=`) sends it where every later reconnect will go.
- On the new socket the server's first frame says which session we have. Same session: every
  open stream is resumed with `{"type":"resume","after":last_seq}`; deltas at or below `last_seq`
  that the server replays anyway are dropped (dedupe by seq), a jump past `last_seq + 1` is an
  error, never a silent gap. New session (the old one expired, or the replica that held it is
  gone; the frame says `resumed: false`): every stream the old session had shown text of
  raises `StreamLost` with that text; one that had shown nothing is sent again.
- A stream started while disconnected is sent once connected. A resume answered `not_found` for a
  stream that has delivered nothing means the server never got its start frame: it is sent again.
- Cancels that may not have reached the server are sent again after a reconnect.

Concurrency: `chat()` is synchronous bookkeeping plus a frame put in the connection's outbox, so
any number of tasks may call it at once. Runs under asyncio and trio (anyio; the socket is ours,
see `asyncllm.client.ws`).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import tenacity
from anyio.streams.memory import MemoryObjectSendStream

from asyncllm import protocol as P
from asyncllm.client.errors import (
    AsyncLLMClientError,
    AuthError,
    ClientClosed,
    ConnectionFailed,
    Overloaded,
    ServerError,
    StreamLost,
    error_from_frame,
)
from asyncllm.client.stream import ChatStream
from asyncllm.client.ws import HandshakeRejected, WSClosed, WSConnection

log = logging.getLogger("asyncllm.client")

# Close codes after which reconnecting cannot help.
_FATAL_CLOSE = {P.CLOSE_UNAUTHORIZED: "unauthorized", 1008: "policy violation"}


class _Retryable(Exception):
    """A connection attempt failed in a way another attempt may fix."""

    def __init__(self, cause: BaseException, retry_after: float | None = None):
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause
        self.retry_after = retry_after


class _Connection:
    """One socket and its outbox; replaced on every reconnect (queued frames die with it, the
    supervisor rebuilds what is still needed from the streams' state)."""

    def __init__(self, ws: WSConnection, session: str, resume_ttl: float):
        self.ws = ws
        self.session = session
        self.resume_ttl = resume_ttl
        send, recv = anyio.create_memory_object_stream[str](math.inf)
        self.outbox: MemoryObjectSendStream[str] = send
        self.outbox_recv = recv
        self.live = True
        self.max_frame_bytes: int | None = None  # when the session frame states it
        self.resumed: bool | None = None  # the session frame's say (None: a server without it)

    def send(self, frame: dict[str, Any]) -> None:
        if self.live:
            try:
                self.outbox.send_nowait(P.encode(frame))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass


class Client:
    """Async client of an asyncllm gateway.

    ```python
    async with Client("ws://127.0.0.1:8000/v1/ws", api_key="KEY") as client:
        async for delta in client.chat([{"role": "user", "content": "Hi"}], max_tokens=64):
            print(delta.text, end="")
    ```

    Reconnect knobs: `reconnect_attempts` failed attempts in a row end an outage (open streams
    then raise StreamLost); waits grow from `backoff_initial` up to `backoff_max` seconds with
    full jitter. `ping_interval`/`ping_timeout` detect a dead socket that never closed.
    `batch` (default on) asks the server to pack the frames it has ready into one message.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8000/v1/ws",
        api_key: str | None = None,
        *,
        reconnect_attempts: int = 8,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        headers: dict[str, str] | None = None,
        max_frame_bytes: int | None = 1 << 24,
        max_request_bytes: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
        batch: bool = True,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
        if reconnect_attempts < 1:
            raise ValueError(f"reconnect_attempts must be >= 1, got {reconnect_attempts}")
        if not 0 <= backoff_initial <= backoff_max:
            raise ValueError("need 0 <= backoff_initial <= backoff_max")
        if connect_timeout <= 0 or ping_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if ping_interval is not None and ping_interval <= 0:
            raise ValueError("ping_interval must be > 0 or None")
        self.url = url
        self._headers = dict(headers or {})
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.reconnect_attempts = reconnect_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_frame_bytes = max_frame_bytes
        # The gateway answers a frame over its limit with an error it cannot tie to a stream
        # (it does not parse it), so requests are measured here first. 1 MiB is the gateway's
        # default; a session frame that states `max_frame_bytes` overrides it.
        self.max_request_bytes = max_request_bytes
        self.ssl_context = ssl_context
        # Ask for batch frames (several frames per message): far less work per token on both
        # ends when many streams share the socket. A server that ignores it sends plain frames.
        self.batch = batch

        self._ids = itertools.count(1)
        self._streams: dict[P.StreamId, ChatStream] = {}
        self._cancelling: set[P.StreamId] = set()  # cancel sent, no done/not_found seen yet
        self._conn: _Connection | None = None
        self._session: str | None = None
        # The key asked for before the server has given us one: proposed by us, so that a proxy
        # hashing on the session key sends the first connection where the reconnects will go.
        self._proposal: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._unserved: _Connection | None = None
        self._open = False
        self._closing = False
        self._fatal: BaseException | None = None  # the client cannot be used again
        self._need_connection: anyio.Event | None = None  # made in __aenter__ (needs a loop)
        # counters, for tests and for people watching a flaky link
        self.reconnects = 0
        self.sessions_lost = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def session(self) -> str | None:
        return self._session

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.live

    async def __aenter__(self) -> Client:
        if self._open:
            raise RuntimeError("Client is already open")
        self._need_connection = anyio.Event()
        conn = await self._connect_retrying()  # the first connection's errors go to the caller
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._open = True
        self._unserved = conn
        self._tg.start_soon(self._supervise, conn)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.aclose()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                return await tg.__aexit__(*exc_info)
            return None
        finally:
            # closed before the supervisor ever ran: its first socket is still ours to close
            if self._unserved is not None:
                await self._unserved.ws.close()
                self._unserved = None

    async def aclose(self) -> None:
        """Cancel every open stream (they raise ClientClosed) and close the socket."""
        if self._closing:
            return
        self._closing = True
        conn = self._conn
        for s in list(self._streams.values()):
            if conn is not None:
                conn.send({"type": P.CANCEL, "id": s.id})
            s.fail(ClientClosed(f"the client was closed while stream {s.id!r} was open"))
        self._streams.clear()
        if conn is not None:
            # let the writer flush the cancels; the supervisor closes the socket politely
            with anyio.move_on_after(1.0, shield=True):
                while conn.live and conn.outbox.statistics().current_buffer_used:
                    await anyio.sleep(0.005)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._open = False

    # ---- starting streams ------------------------------------------------------------------------

    def chat(
        self, messages: Sequence[dict[str, Any]], *, model: str | None = None, **params: Any
    ) -> ChatStream:
        """Start a chat; returns its stream at once (frames go out in the background).

        `params`: max_tokens, temperature, top_p, top_k, min_p, seed, stop, presence_penalty,
        frequency_penalty, repetition_penalty, logprobs, top_logprobs, n, priority, and the
        extensions return_token_ids, stop_token_ids, ignore_eos, min_tokens; constraints:
        response_format, structured_outputs, tools, tool_choice, logit_bias (deltas then carry
        `tool_calls` pieces; `stream.tool_calls()` assembles them). Bad values raise
        ValueError here, before anything is sent.
        """
        msgs = P.parse_messages(list(messages))
        return self._start({"type": P.CHAT, "messages": msgs}, model, params)

    def complete(self, prompt: str | list[int], *, model: str | None = None, **params: Any):
        """The plain-prompt twin of `chat` (a string, or token ids)."""
        return self._start({"type": P.COMPLETE, "prompt": P.parse_prompt(prompt)}, model, params)

    def _start(self, frame: dict[str, Any], model: str | None, params: dict[str, Any]):
        if not self._open or self._closing:
            raise ClientClosed("the client is not open: use `async with Client(...) as client`")
        if self._fatal is not None:
            raise self._fatal
        gp = P.parse_params({k: v for k, v in params.items() if v is not None})
        sid = next(self._ids)
        frame["id"] = sid
        clean = {k: v for k, v in params.items() if v is not None}
        if "stop" in clean and isinstance(clean["stop"], str):
            clean["stop"] = [clean["stop"]]
        if isinstance(clean.get("logit_bias"), dict):  # JSON object keys are strings
            clean["logit_bias"] = {str(k): v for k, v in clean["logit_bias"].items()}
        if clean:
            frame["params"] = clean
        if model is not None:
            frame["model"] = model
        size = len(P.encode(frame).encode())
        if size > self.max_request_bytes:
            raise ValueError(
                f"the request is {size} bytes; the server takes frames of at most "
                f"{self.max_request_bytes} bytes"
            )
        s = ChatStream(sid, frame, gp.n, self._cancel_stream)
        self._streams[sid] = s
        conn = self._conn
        if conn is not None and conn.live:
            s.submitted = True
            conn.send(frame)
        elif self._need_connection is not None:
            self._need_connection.set()  # wakes a supervisor idling after a failed outage
        return s

    def _cancel_stream(self, s: ChatStream) -> None:
        was_open = self._streams.pop(s.id, None) is not None
        s.finish_cancelled()
        if was_open and s.submitted:
            self._cancelling.add(s.id)
            if self._conn is not None:
                self._conn.send({"type": P.CANCEL, "id": s.id})

    # ---- connecting ------------------------------------------------------------------------------

    def _url_for(self) -> str:
        if not self.batch:
            return self.url
        parts = urlsplit(self.url)
        ours = ("session", P.BATCH_QUERY)
        q = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
        q.append((P.BATCH_QUERY, "1"))
        return urlunsplit(parts._replace(query=urlencode(q)))

    def _session_to_ask(self) -> str:
        if self._session is not None:
            return self._session
        if self._proposal is None:
            self._proposal = secrets.token_urlsafe(24)
        return self._proposal

    def _headers_for(self, session: str | None) -> dict[str, str]:
        # The session is a secret (it resumes our streams): a header, not the URL, which ends
        # up in access logs and proxies.
        if session is None:
            return self._headers
        return {**self._headers, P.SESSION_HEADER: session}

    async def _connect_once(self) -> _Connection:
        """One attempt: socket, upgrade, and the server's `session` frame."""
        try:
            ws = await WSConnection.open(
                self._url_for(),
                self._headers_for(self._session_to_ask()),
                timeout=self.connect_timeout,
                max_size=self.max_frame_bytes,
                ssl_context=self.ssl_context,
            )
        except HandshakeRejected as e:
            raise self._handshake_error(e) from None
        except (OSError, TimeoutError, WSClosed) as e:
            raise _Retryable(e) from None
        try:
            with anyio.fail_after(self.connect_timeout):
                first = P.parse_server_frame(await ws.recv())
        except WSClosed as e:
            await ws.abort()
            if e.code in _FATAL_CLOSE:
                raise self._close_error(e) from None
            raise _Retryable(e, 1.0 if e.code == P.CLOSE_OVERLOADED else None) from None
        except (TimeoutError, ValueError) as e:
            await ws.abort()
            raise _Retryable(e) from None
        if first["type"] == P.ERROR:
            await ws.abort()
            err = error_from_frame(first)
            if isinstance(err, Overloaded):
                raise _Retryable(err, err.retry_after)
            raise err
        if first["type"] != P.SESSION:
            await ws.abort()
            raise ServerError(P.INTERNAL, f"expected a session frame first, got {first['type']}")
        conn = _Connection(ws, str(first["session"]), float(first["resume_ttl"]))
        if isinstance(first.get("resumed"), bool):
            conn.resumed = first["resumed"]
        mfb = first.get("max_frame_bytes")
        if isinstance(mfb, int) and mfb > 0:
            conn.max_frame_bytes = mfb
        return conn

    def _handshake_error(self, e: HandshakeRejected) -> BaseException:
        msg = f"the server refused the WebSocket upgrade: {e}"
        if e.status in (401, 403):
            return AuthError(msg)
        if e.status in (429, 503) or e.status >= 500:
            ra = e.headers.get("retry-after")
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            return _Retryable(Overloaded(msg, retry_after), retry_after)
        return ServerError(P.NOT_FOUND if e.status == 404 else P.INVALID_REQUEST, msg)

    def _close_error(self, e: WSClosed) -> BaseException:
        if e.code == P.CLOSE_UNAUTHORIZED:
            return AuthError(f"the server closed the socket: {e.reason}")
        return ServerError(P.INVALID_REQUEST, f"the server closed the socket: {e}")

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # full jitter (uniform in [0, cap]), cap doubling from backoff_initial up to backoff_max;
        # at least what the server asked for with Retry-After
        cap = min(self.backoff_max, self.backoff_initial * 2 ** (state.attempt_number - 1))
        w = tenacity.wait_random(0, cap)(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after:
            w = max(w, min(exc.retry_after, max(self.backoff_max, 1.0)))
        return w

    async def _connect_retrying(self) -> _Connection:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.reconnect_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._connect_once()
        except _Retryable as e:
            cause = e.cause
            if isinstance(cause, AsyncLLMClientError):
                raise cause from None
            raise ConnectionFailed(
                f"could not connect to {self.url} in {self.reconnect_attempts} attempts: {e}"
            ) from cause
        raise AssertionError("unreachable")

    # ---- the supervisor --------------------------------------------------------------------------

    async def _supervise(self, conn: _Connection | None) -> None:
        """Owns the socket for the client's life: serve it, reconnect when it drops."""
        try:
            while not self._closing and self._fatal is None:
                if conn is None:
                    try:
                        conn = await self._connect_retrying()
                    except (AuthError, ServerError) as e:
                        self._fatal = e
                        self._fail_all(e)
                        return
                    except ConnectionFailed as e:
                        # open streams cannot wait forever; new ones wake us for another try
                        self._fail_all(
                            StreamLost(f"the connection was lost and not re-established: {e}"),
                            unsent=e,
                        )
                        self._need_connection = anyio.Event()
                        await self._need_connection.wait()
                        continue
                    self.reconnects += 1
                await self._serve(conn)
                conn = None
        except Exception as e:  # a bug must still end every stream with an error
            log.exception("client supervisor failed")
            self._fatal = ClientClosed(f"the client failed: {e!r}")
            self._fail_all(self._fatal)

    def _fail_all(self, error: BaseException, unsent: BaseException | None = None) -> None:
        """End every open stream with `error` (streams never sent: with `unsent`, if given)."""
        for s in list(self._streams.values()):
            e = unsent if unsent is not None and not s.submitted else error
            s.fail(_copy_error(e, s))
        self._streams.clear()

    def _adopt(self, conn: _Connection) -> None:
        """A socket is up: bring every stream's server state in line with ours."""
        # A server that says whether it resumed is believed (it may hand back the key we asked
        # for on a new, empty session: the old one expired, or its replica died).
        lost = self._session is not None and (
            conn.session != self._session or conn.resumed is False
        )
        self._session = conn.session
        self._proposal = None
        if conn.max_frame_bytes:
            self.max_request_bytes = conn.max_frame_bytes
        if lost:
            self.sessions_lost += 1
            self._cancelling.clear()
        for s in list(self._streams.values()):
            if not s.submitted or (lost and s.last_seq == 0):
                # never sent, or sent to a session that is gone before it showed anything
                s.submitted = True
                conn.send(s.request)
            elif lost:
                del self._streams[s.id]
                s.fail(
                    StreamLost(
                        f"stream {s.id!r} was lost: the session expired on the server while "
                        f"the client was disconnected",
                        s.received_text(),
                        s.id,
                    )
                )
            else:
                s.resuming = True
                conn.send({"type": P.RESUME, "id": s.id, "after": s.last_seq})
        for sid in self._cancelling:
            conn.send({"type": P.CANCEL, "id": sid})

    async def _serve(self, conn: _Connection) -> None:
        self._unserved = None
        self._adopt(conn)
        self._conn = conn
        fatal: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def guarded(fn) -> None:
                    nonlocal fatal
                    try:
                        await fn(conn)
                    except WSClosed as e:
                        if e.code in _FATAL_CLOSE:
                            fatal = self._close_error(e)
                        elif e.code == P.CLOSE_SESSION_TAKEN:
                            # someone else resumed our session: its streams are theirs now
                            self._fail_all(StreamLost(f"session taken over by another socket: {e}"))
                            self._session = None
                        log.debug("connection ended: %s", e)
                    except AsyncLLMClientError as e:
                        fatal = e
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(guarded, self._reader)
                tg.start_soon(guarded, self._writer)
                if self.ping_interval is not None:
                    tg.start_soon(guarded, self._keepalive)
        finally:
            conn.live = False
            conn.outbox.close()
            if self._conn is conn:
                self._conn = None
            if self._closing:
                await conn.ws.close()  # shielded and bounded
            else:
                await conn.ws.abort()
        if fatal is not None:
            self._fatal = fatal
            self._fail_all(fatal)

    async def _writer(self, conn: _Connection) -> None:
        async for text in conn.outbox_recv:
            await conn.ws.send_text(text)

    async def _keepalive(self, conn: _Connection) -> None:
        assert self.ping_interval is not None
        while True:
            await anyio.sleep(self.ping_interval)
            await conn.ws.ping(self.ping_timeout)

    async def _reader(self, conn: _Connection) -> None:
        while True:
            raw = await conn.ws.recv()
            try:
                frames = P.parse_server_frames(raw)
            except ValueError as e:
                raise ServerError(P.INTERNAL, f"the server sent a malformed frame: {e}") from None
            for frame in frames:
                self._dispatch(conn, frame)

    def _dispatch(self, conn: _Connection, frame: dict[str, Any]) -> None:
        t = frame["type"]
        sid = frame.get("id")
        if t == P.SESSION:
            return
        if t == P.DONE:
            self._cancelling.discard(sid)
        s = self._streams.get(sid)
        if t == P.DELTA:
            if s is not None:
                s.feed_delta(frame)
                if s.done:  # a gap failed it
                    del self._streams[sid]
        elif t == P.DONE:
            if s is not None:
                s.feed_done(frame)
                del self._streams[sid]
        elif t == P.ERROR:
            if sid is None:
                err = error_from_frame(frame)
                if isinstance(err, AuthError):
                    raise err
                log.warning("server error: %s", err)
                return
            if sid in self._cancelling:
                self._cancelling.discard(sid)
                return
            if s is None:
                return
            if s.resuming and frame.get("code") == P.NOT_FOUND:
                s.resuming = False
                if s.last_seq == 0:
                    conn.send(s.request)  # the start frame never reached the server
                    return
                del self._streams[sid]
                s.fail(
                    StreamLost(
                        f"stream {sid!r} was lost: the server no longer has it ({frame['message']})",
                        s.received_text(),
                        sid,
                    )
                )
                return
            del self._streams[sid]
            s.fail(error_from_frame(frame))


def _copy_error(error: BaseException, s: ChatStream) -> BaseException:
    """One exception object per stream, carrying that stream's own partial text."""
    if isinstance(error, StreamLost):
        e: BaseException = StreamLost(str(error), s.received_text(), s.id)
    elif isinstance(error, ServerError):
        e = type(error).__new__(type(error))
        e.__dict__.update(error.__dict__)
        e.args = error.args
        e.text = s.received_text()  # type: ignore[attr-defined]
    elif isinstance(error, AsyncLLMClientError):
        e = type(error)(str(error))
        e.text = s.received_text()  # type: ignore[attr-defined]
    else:
        e = error
    if e is not error:
        e.__cause__ = error.__cause__ or error
    return e
