"""Sessions, streams and replay buffers on their own: numbering, coalescing, replay, TTL."""

from __future__ import annotations

import orjson
import pytest

from asyncllm.gateway.engine_io import Piece
from asyncllm.gateway.sessions import SessionManager, Stream
from asyncllm.protocol import INVALID_REQUEST, NOT_FOUND, ProtocolError


def frames(data: list[str]) -> list[dict]:
    return [orjson.loads(d) for d in data]


def piece(text: str, index: int = 0, finish: str | None = None) -> Piece:
    return Piece(index, text, [ord(c) for c in text], None, finish)


class FakeWriter:
    def __init__(self):
        self.woken: list[Stream] = []
        self.taken = False

    def wake(self, stream):
        self.woken.append(stream)

    def take_over(self):
        self.taken = True

    def close_when_flushed(self):
        pass


def test_numbered_when_taken_and_coalesced_per_index():
    s = Stream("a", "r", n=2, prompt_tokens=3)
    s.add([piece("he"), piece("X", 1)])
    s.add([piece("llo")])
    out = frames(s.take_frames())
    assert [(f["seq"], f["index"], f["text"]) for f in out] == [(1, 0, "hello"), (2, 1, "X")]
    assert s.take_frames() == []
    s.add([piece("!", 0, "stop"), piece("Y", 1, "length")])
    s.finish()
    out = frames(s.take_frames())
    assert [f["seq"] for f in out] == [3, 4, 5]
    done = out[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["finish_reasons"] == ["stop", "length"]
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 8}
    assert s.take_frames() == [] and s.done_sent


def test_token_ids_only_when_asked():
    s = Stream("a", "r", return_token_ids=True)
    s.add([piece("ab")])
    (f,) = frames(s.take_frames())
    assert f["token_ids"] == [97, 98]
    s = Stream("a", "r")
    s.add([piece("ab")])
    (f,) = frames(s.take_frames())
    assert "token_ids" not in f
    # Tokens with no text yet (held back by the detokenizer) make no frame but count.
    s.add([Piece(0, "", [5], None, None)])
    assert not s.has_frames
    s.finish()
    (d,) = frames(s.take_frames())
    assert d["usage"]["completion_tokens"] == 3


def test_replay_is_exact_and_then_live():
    s = Stream("a", "r")
    sent = []
    for ch in "abcde":
        s.add([piece(ch)])
        sent += s.take_frames()
    # The client saw up to seq 2; seqs 3..5 are replayed exactly as first sent.
    assert s.replay(2) == sent[2:]
    assert s.replay(5) == []
    with pytest.raises(ProtocolError) as ei:
        s.replay(6)
    assert ei.value.code == INVALID_REQUEST
    s.add([piece("f")])
    (f,) = frames(s.take_frames())
    assert f["seq"] == 6 and f["text"] == "f"


def test_replay_buffer_bound_gives_a_clear_error():
    s = Stream("a", "r", replay_limit=200)
    for _ in range(20):
        s.add([piece("x" * 10)])
        s.take_frames()
    assert s.log_bytes <= 200 and s.dropped_through > 0
    with pytest.raises(ProtocolError) as ei:
        s.replay(0)
    assert ei.value.code == NOT_FOUND
    assert len(frames(s.replay(s.last_seq - 1))) == 1


def test_error_finish_sends_error_then_done():
    s = Stream("a", "r")
    s.add([piece("ab")])
    s.finish(error={"code": "internal", "message": "boom"})
    out = frames(s.take_frames())
    assert [f["type"] for f in out] == ["delta", "error", "done"]
    assert out[1] == {"type": "error", "id": "a", "code": "internal", "message": "boom"}
    assert out[2]["finish_reason"] == "error" and out[2]["error"]["code"] == "internal"
    assert out[2]["seq"] == 2
    # A replay carries the done (with its error), not the unnumbered error frame.
    assert [f["type"] for f in frames(s.replay(0))] == ["delta", "done"]


def test_cancel_calls_the_canceller_once_running():
    s = Stream("a", "r")
    called = []
    s.canceller = lambda: called.append(1)
    s.cancel()
    assert called == [1] and s.cancel_requested
    s.finish("cancelled")
    s.cancel()
    assert called == [1]
    (d,) = frames(s.take_frames())
    assert d["finish_reason"] == "cancelled"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_session_detach_resume_and_ttl():
    clock = Clock()
    mgr = SessionManager(resume_ttl=10, clock=clock)
    w1 = FakeWriter()
    sess = mgr.attach(None, None, w1)
    a, b = Stream("a", "ra"), Stream("b", "rb")
    cancelled = []
    b.canceller = lambda: cancelled.append("b")
    sess.add(a)
    sess.add(b)
    a.add([piece("x")])
    sess.notify(a)
    assert w1.woken == [a]
    a.take_frames()

    mgr.detach(sess, w1)
    assert not a.attached and not b.attached
    b.add([piece("1")])
    sess.notify(b)  # detached: nobody is woken
    assert w1.woken == [a]

    clock.t = 5
    w2 = FakeWriter()
    assert mgr.attach(sess.key, None, w2) is sess
    stream, replay = mgr.resume(sess, "a", 0)
    assert stream is a and a.attached and [f["text"] for f in frames(replay)] == ["x"]
    with pytest.raises(ProtocolError) as ei:
        mgr.resume(sess, "zz", 0)
    assert ei.value.code == NOT_FOUND

    # b was never resumed: its TTL runs from the drop, whatever the session does.
    clock.t = 9.9
    assert mgr.reap() == 0
    clock.t = 10
    assert mgr.reap() == 1
    assert cancelled == ["b"] and sess.get("b") is None and sess.get("a") is a


def test_session_expires_without_reconnect():
    clock = Clock()
    mgr = SessionManager(resume_ttl=1, clock=clock)
    w = FakeWriter()
    sess = mgr.attach(None, None, w)
    s = Stream("a", "r")
    cancelled = []
    s.canceller = lambda: cancelled.append(1)
    sess.add(s)
    mgr.detach(sess, w)
    clock.t = 1.0
    mgr.reap()
    assert cancelled == [1] and sess.key not in mgr.sessions
    # An expired key gets a fresh, empty session under the same key (the replica a proxy
    # hashes it to is this one), and says it is not the old one.
    again, resumed = mgr.attach_session(sess.key, None, FakeWriter())
    assert again is not sess and again.key == sess.key and not again.streams and not resumed


def test_proposed_keys():
    mgr = SessionManager(resume_ttl=30)
    proposal = "p" * 32
    sess, resumed = mgr.attach_session(proposal, None, FakeWriter())
    assert sess.key == proposal and not resumed
    sess.add(Stream("a", "r"))
    w = FakeWriter()
    assert mgr.attach_session(proposal, None, w) == (sess, True)
    # Too short to be unguessable, or not URL-safe: a random key instead.
    for bad in ("short", "x" * 21, "y" * 129, "z" * 30 + "/=", "a b" * 10):
        other, resumed = mgr.attach_session(bad, None, FakeWriter())
        assert other.key != bad and not resumed
    # A key someone else owns is never taken, nor shadowed: the caller gets a random one.
    owned, _ = mgr.attach_session("o" * 32, "alice", FakeWriter())
    mine, resumed = mgr.attach_session("o" * 32, "bob", FakeWriter())
    assert mine.key != owned.key and not resumed and mgr.sessions[owned.key] is owned


def test_takeover_and_owner():
    mgr = SessionManager(resume_ttl=30)
    w1, w2 = FakeWriter(), FakeWriter()
    sess = mgr.attach(None, "alice", w1)
    assert mgr.attach(sess.key, "alice", w2) is sess
    assert w1.taken and sess.writer is w2
    # Another key cannot take over someone else's session.
    other = mgr.attach(sess.key, "bob", FakeWriter())
    assert other is not sess and sess.writer is w2


def test_ids_unique_while_active_and_finished_streams_bounded():
    mgr = SessionManager(resume_ttl=30, finished_kept=2)
    sess = mgr.attach(None, None, FakeWriter())
    s = Stream("a", "r")
    sess.add(s)
    with pytest.raises(ProtocolError) as ei:
        sess.add(Stream("a", "r2"))
    assert ei.value.code == INVALID_REQUEST and ei.value.id == "a"
    for sid in ("a", "b", "c"):
        st = sess.get(sid) or Stream(sid, "r")
        if sess.get(sid) is None:
            sess.add(st)
        st.finish("stop")
        st.take_frames()
        sess.on_done_sent(st)
    # Only the two newest finished streams stay resumable.
    assert sess.get("a") is None and sess.get("b") and sess.get("c")
    # A finished, delivered id may be used again.
    sess.add(Stream("b", "r3"))
    assert sess.get("b").request_id == "r3"


def test_empty_session_is_dropped_at_once():
    mgr = SessionManager(resume_ttl=30)
    w = FakeWriter()
    sess = mgr.attach(None, None, w)
    mgr.detach(sess, w)
    assert sess.key not in mgr.sessions
    # A takeover is not a drop: the session stays, its streams wait for a resume.
    w1, w2 = FakeWriter(), FakeWriter()
    sess = mgr.attach(None, None, w1)
    s = Stream("a", "r")
    sess.add(s)
    assert mgr.attach(sess.key, None, w2) is sess and not s.attached
    mgr2 = SessionManager(resume_ttl=30)
    empty = mgr2.attach(None, None, w1)
    assert mgr2.attach(empty.key, None, w2) is empty and empty.key in mgr2.sessions
