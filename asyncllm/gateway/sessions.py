"""Sessions, streams and replay buffers: the resume logic, free of sockets and of the engine.

Numbering rule (what makes resume exact): a stream's output is accumulated *unnumbered*, per
sequence index, and gets its seq only when a writer takes it to send. While a socket is slow or
gone, whatever piles up is therefore coalesced (one delta per index) instead of dropped, and seq
numbers never skip: every number the client could ever see belongs to a frame that was built,
logged and handed to a socket. The log of built frames is the replay buffer: a resume with
`after=N` re-sends logged frames N+1.. exactly as first built, then the stream goes on live.
The log is bounded (bytes per stream); a resume that needs frames already dropped from it gets a
clear error instead of a silent gap.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncllm.gateway.engine_io import Piece
from asyncllm.protocol import (
    INVALID_REQUEST,
    NOT_FOUND,
    SESSION_KEY_RE,
    ProtocolError,
    StreamId,
    delta_frame,
    done_frame,
    encode,
    error_frame,
)
from asyncllm.tools import ToolCallStream


class Writer(Protocol):
    """The socket side a session is attached to (ws.Connection)."""

    def wake(self, stream: Stream) -> None: ...
    def take_over(self) -> None: ...  # another socket has taken this session
    def close_when_flushed(self) -> None: ...  # shutting down: close once what is due is sent


@dataclass
class _Pending:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI-shaped tool-call deltas, in order


class Stream:
    """One chat/complete request of a session: its undelivered output and its replay log."""

    def __init__(
        self,
        id: StreamId,
        request_id: str,
        n: int = 1,
        prompt_tokens: int = 0,
        return_token_ids: bool = False,
        replay_limit: int = 4 << 20,
        tool_streams: list[ToolCallStream] | None = None,
    ):
        self.id = id
        # A chat with tools: each index's text goes through its ToolCallStream (content and
        # tool-call pieces out).
        self.tool_streams = tool_streams
        self.request_id = request_id
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.return_token_ids = return_token_ids
        self.replay_limit = replay_limit
        self.pending: dict[int, _Pending] = {}
        self.finish_reasons: list[str | None] = [None] * n
        self.completion_tokens = 0
        self.finished = False  # no more output will come
        self.final_reason: str | None = None
        self.error: dict[str, str] | None = None
        self.error_frame_due = False
        self.done_sent = False  # the done frame has been built (and logged)
        self.next_seq = 1
        self.log: deque[tuple[int, str]] = deque()
        self.log_bytes = 0
        self.dropped_through = 0  # frames with seq <= this fell out of the replay log
        self.attached = True
        self.detached_at: float | None = None
        self.canceller: Callable[[], None] | None = None  # set by whoever runs the request
        self.cancel_requested = False

    # ---- output in ---------------------------------------------------------------------------
    def add(self, pieces: Iterable[Piece]) -> bool:
        """Accumulate engine output; True when there is something new to send."""
        new = False
        for p in pieces:
            if self.finished:
                break
            self.completion_tokens += len(p.token_ids)
            text, calls, finish = p.text, None, p.finish_reason
            if self.tool_streams is not None and 0 <= p.index < len(self.tool_streams):
                ts = self.tool_streams[p.index]
                d = ts.feed(p.text)
                text, calls = d.content, list(d.tool_calls)
                if finish is not None:
                    end = ts.finish()
                    text += end.content
                    calls += end.tool_calls
                    finish = ts.finish_reason(finish)
            if text or calls or (self.return_token_ids and p.token_ids) or p.logprobs:
                pend = self.pending.setdefault(p.index, _Pending())
                if text:
                    pend.text.append(text)
                if calls:
                    pend.tool_calls = (pend.tool_calls or []) + calls
                pend.token_ids.extend(p.token_ids)
                if p.logprobs:
                    pend.logprobs = (pend.logprobs or []) + p.logprobs
                new = True
            if finish is not None and 0 <= p.index < self.n:
                self.finish_reasons[p.index] = finish
        return new

    def finish(self, reason: str | None = None, error: dict[str, str] | None = None) -> None:
        """No more output. `reason` overrides the sequences' own (cancelled, error)."""
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self.error = error
            self.error_frame_due = True
            reason = "error"
        if reason is None:
            reasons = [r for r in self.finish_reasons if r]
            reason = reasons[0] if reasons else "stop"
            if "cancelled" in reasons:
                reason = "cancelled"
        self.final_reason = reason

    def cancel(self) -> None:
        """Stop generating; the runner finishes the stream as cancelled."""
        self.cancel_requested = True
        if self.canceller is not None and not self.finished:
            self.canceller()

    # ---- frames out --------------------------------------------------------------------------
    @property
    def has_frames(self) -> bool:
        return bool(self.pending) or (self.finished and not self.done_sent)

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def _number(self, frame: dict[str, Any]) -> str:
        frame["seq"] = self.next_seq
        data = encode(frame)
        self.log.append((self.next_seq, data))
        self.log_bytes += len(data)
        self.next_seq += 1
        # Keep at least the newest frame so the log always reaches last_seq.
        while self.log_bytes > self.replay_limit and len(self.log) > 1:
            seq, old = self.log.popleft()
            self.log_bytes -= len(old)
            self.dropped_through = seq
        return data

    def take_frames(self) -> list[str]:
        """Everything undelivered as encoded frames, numbered now: one delta per index with
        pending output (index order), then an error frame and the done frame if finished."""
        out = []
        for index in sorted(self.pending):
            p = self.pending[index]
            out.append(
                self._number(
                    delta_frame(
                        self.id,
                        0,
                        "".join(p.text),
                        index,
                        p.token_ids if self.return_token_ids else None,
                        p.logprobs,
                        p.tool_calls,
                    )
                )
            )
        self.pending.clear()
        if self.finished and not self.done_sent:
            if self.error_frame_due and self.error is not None:
                # Unnumbered: the done frame that follows carries the same error for replays.
                out.append(encode(error_frame(self.id, self.error["code"], self.error["message"])))
                self.error_frame_due = False
            fr = [r or self.final_reason or "stop" for r in self.finish_reasons]
            if self.final_reason in ("cancelled", "error"):
                fr = [r if r in ("stop", "length", "tool_calls") else self.final_reason for r in fr]
            out.append(
                self._number(
                    done_frame(
                        self.id,
                        0,
                        self.final_reason or "stop",
                        self.prompt_tokens,
                        self.completion_tokens,
                        fr if self.n > 1 else None,
                        self.error,
                    )
                )
            )
            self.done_sent = True
        return out

    def replay(self, after: int) -> list[str]:
        """Logged frames with seq > after, as first sent."""
        if after > self.last_seq:
            raise ProtocolError(
                INVALID_REQUEST,
                f"cannot resume stream {self.id!r} after seq {after}: the last seq sent is "
                f"{self.last_seq}",
                self.id,
            )
        if after < self.dropped_through:
            raise ProtocolError(
                NOT_FOUND,
                f"cannot resume stream {self.id!r} after seq {after}: frames up to "
                f"{self.dropped_through} no longer fit the replay buffer",
                self.id,
            )
        return [data for seq, data in self.log if seq > after]


class Session:
    def __init__(self, key: str, owner: str | None, finished_kept: int):
        self.key = key
        self.owner = owner
        self.finished_kept = finished_kept
        self.streams: dict[StreamId, Stream] = {}
        self.delivered: deque[StreamId] = deque()  # streams whose done was sent, oldest first
        self.writer: Writer | None = None
        self.detached_at: float | None = None
        # The unfinished ones among `streams`: active() is checked for every new stream, and
        # `streams` also keeps up to finished_kept finished ones (at a wave of 64 new streams,
        # counting over all of them was ~5x the work).
        self._unfinished: set[Stream] = set()

    def active(self) -> int:
        live = self._unfinished
        done = [s for s in live if s.finished]
        for s in done:
            live.discard(s)
        return len(live)

    def get(self, id: StreamId) -> Stream | None:
        return self.streams.get(id)

    def add(self, stream: Stream) -> None:
        old = self.streams.get(stream.id)
        if old is not None:
            if not old.finished or not old.done_sent:
                raise ProtocolError(
                    INVALID_REQUEST, f"stream id {stream.id!r} is in use in this session", stream.id
                )
            self._forget(stream.id)
        self.streams[stream.id] = stream
        if not stream.finished:
            self._unfinished.add(stream)

    def _forget(self, id: StreamId) -> None:
        s = self.streams.pop(id, None)
        if s is not None:
            self._unfinished.discard(s)
        try:
            self.delivered.remove(id)
        except ValueError:
            pass

    def notify(self, stream: Stream) -> None:
        """The stream has new output (or finished)."""
        if stream.attached and self.writer is not None:
            self.writer.wake(stream)

    def on_done_sent(self, stream: Stream) -> None:
        """Keep finished streams resumable, up to a bound (the oldest are forgotten)."""
        if self.streams.get(stream.id) is not stream:
            return
        self.delivered.append(stream.id)
        while len(self.delivered) > self.finished_kept:
            self.streams.pop(self.delivered.popleft(), None)

    def cancel_all(self) -> None:
        for s in list(self.streams.values()):
            s.cancel()


class SessionManager:
    """All sessions of one app. A dropped socket leaves its session's streams running, detached,
    for resume_ttl seconds; `reap` cancels what nobody resumed in time."""

    def __init__(
        self,
        resume_ttl: float,
        finished_kept: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.resume_ttl = resume_ttl
        self.finished_kept = finished_kept
        self.clock = clock
        self.sessions: dict[str, Session] = {}

    def attach(self, key: str | None, owner: str | None, writer: Writer) -> Session:
        return self.attach_session(key, owner, writer)[0]

    def attach_session(
        self, key: str | None, owner: str | None, writer: Writer
    ) -> tuple[Session, bool]:
        """(session, resumed): the session `key` if it is alive and belongs to `owner`
        (resumed), else a new one. The new one has the key asked for when that key is
        well-formed and free: a client proposes its key on its first connection, so that a proxy
        hashing on the key sends that connection where its reconnects will go (and an expired
        session comes back, empty, on the replica the key hashes to). A key held by another
        owner is never taken: that caller gets a random key. A socket that takes over a session
        still attached elsewhere (a half-open old socket) wins."""
        sess = self.sessions.get(key) if key else None
        if sess is None or sess.owner != owner:
            if key is None or sess is not None or not SESSION_KEY_RE.fullmatch(key):
                key = secrets.token_urlsafe(16)
            sess = Session(key, owner, self.finished_kept)
            self.sessions[key] = sess
            resumed = False
        else:
            resumed = True
        if resumed and sess.writer is not None and sess.writer is not writer:
            old = sess.writer
            self._detach_streams(sess)  # they wait for a resume on the new socket
            old.take_over()
        sess.writer = writer
        sess.detached_at = None
        return sess, resumed

    def detach(self, sess: Session, writer: Writer) -> None:
        if sess.writer is not writer:
            return
        sess.writer = None
        sess.detached_at = self.clock()
        if not sess.streams:  # nothing to resume: do not keep an empty session for the TTL
            self.sessions.pop(sess.key, None)
            return
        self._detach_streams(sess)

    def _detach_streams(self, sess: Session) -> None:
        now = self.clock()
        for s in sess.streams.values():
            if s.attached:
                s.attached = False
                s.detached_at = now

    def resume(self, sess: Session, id: StreamId, after: int) -> tuple[Stream, list[str]]:
        """Re-attach stream `id`: the frames to replay first, then it goes on live."""
        s = sess.get(id)
        if s is None:
            raise ProtocolError(
                NOT_FOUND, f"no stream {id!r} in this session (finished long ago or expired)", id
            )
        frames = s.replay(after)
        s.attached = True
        s.detached_at = None
        return s, frames

    def reap(self) -> int:
        """Cancel detached streams (and drop sessions) past the TTL. Returns streams dropped."""
        now = self.clock()
        ttl = self.resume_ttl
        dropped = 0
        for key, sess in list(self.sessions.items()):
            if (
                sess.writer is None
                and sess.detached_at is not None
                and now - sess.detached_at >= ttl
            ):
                for s in sess.streams.values():
                    s.cancel()
                    dropped += 1
                del self.sessions[key]
                continue
            for sid, s in list(sess.streams.items()):
                if not s.attached and s.detached_at is not None and now - s.detached_at >= ttl:
                    s.cancel()
                    sess._forget(sid)
                    dropped += 1
        return dropped

    def open_streams(self) -> int:
        return sum(sess.active() for sess in self.sessions.values())

    def close_all(self) -> None:
        for sess in self.sessions.values():
            sess.cancel_all()
        self.sessions.clear()
