"""asyncllm.client against a scripted in-test gateway that speaks protocol v1 (websockets.serve
on its own thread), for exact fault scenarios: replays, gaps, expired sessions, error codes,
dropped handshakes. The end-to-end proofs against the real gateway are in test_client_e2e.py."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve

from asyncllm import protocol as P
from asyncllm.client import (
    AuthError,
    Client,
    ClientClosed,
    ConnectionFailed,
    Overloaded,
    ServerError,
    StreamLost,
    SyncClient,
)
from tests.fault_proxy import Cut, FaultProxy, random_plan

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(reconnect_attempts=12, backoff_initial=0.01, backoff_max=0.1, connect_timeout=3.0)


def expected_chunks(content: str, max_tokens: int, n: int = 1) -> list[tuple[int, str]]:
    """What the fake gateway generates: (index, text) per delta, choices interleaved."""
    return [(i, f"{content}/{i}-{k} ") for k in range(max_tokens) for i in range(n)]


def expected_text(content: str, max_tokens: int, index: int = 0, n: int = 1) -> str:
    return "".join(t for i, t in expected_chunks(content, max_tokens, n) if i == index)


# ---- a scripted gateway ----------------------------------------------------------------------


@dataclass
class FakeStream:
    id: Any
    frames: list[dict] = field(default_factory=list)  # everything sent, for replay
    task: asyncio.Task | None = None
    finished: bool = False
    attached: bool = True  # streams stay detached after a reconnect until resumed
    sent_upto: int = 0


@dataclass
class FakeSession:
    id: str
    ws: ServerConnection | None = None
    streams: dict[Any, FakeStream] = field(default_factory=dict)
    detached_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FakeGateway:
    """Protocol v1 with knobs. Streams emit one delta every `interval` s into a replay buffer and
    to the attached socket; a detached session expires after `resume_ttl` s."""

    def __init__(self, interval: float = 0.002, resume_ttl: float = 30.0):
        self.interval = interval
        self.resume_ttl = resume_ttl
        self.api_keys: tuple[str, ...] = ()
        self.reject_status: int | None = None  # answer upgrades with this HTTP status
        self.errors: dict[str, dict] = {}  # message content -> error frame fields
        self.replay_everything = False  # misbehave: replay from seq 1 whatever `after` says
        self.skip_seq: int | None = None  # misbehave: never send this seq
        self.lose_unstarted = False  # forget streams without deltas when their socket drops
        self.first_delay = 0.0
        self.close_delay = 0.0  # a dropped socket's cleanup runs this late (a slow close)
        self.sessions: dict[str, FakeSession] = {}
        self.connections = 0
        self.received: list[dict] = []
        self._ids = itertools.count(1)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None

    def url(self, path: str = "/v1/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> FakeGateway:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def call(self, fn, *args):
        """Run fn(*args) on the server's loop (from a test thread) and return its result."""
        assert self._loop is not None

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def expire_all(self) -> None:
        def expire():
            for sess in self.sessions.values():
                for st in sess.streams.values():
                    if st.task:
                        st.task.cancel()
            self.sessions.clear()

        self.call(expire)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request
        ) as server:
            self.port = server.sockets[0].getsockname()[1] if hasattr(server, "sockets") else 0
            self.port = list(server.sockets)[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def _process_request(self, conn, request):
        if self.reject_status is not None:
            return conn.respond(HTTPStatus(self.reject_status), "refused\n")
        if self.api_keys:
            auth = request.headers.get("Authorization", "")
            if auth.removeprefix("Bearer ") not in self.api_keys:
                return conn.respond(HTTPStatus.UNAUTHORIZED, "bad key\n")
        return None

    async def _send(self, sess: FakeSession, frame: dict) -> None:
        ws = sess.ws
        if ws is not None:
            try:
                await ws.send(P.encode(frame))
            except Exception:
                pass

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        q = parse_qs(urlsplit(ws.request.path).query)
        want = ws.request.headers.get(P.SESSION_HEADER) or q.get("session", [None])[0]
        sess = self.sessions.get(want) if want else None
        if sess is not None and sess.detached_at is not None:
            if time.monotonic() - sess.detached_at > self.resume_ttl:
                self._drop_session(sess)
                sess = None
        resumed = sess is not None
        if sess is None:
            sess = FakeSession(f"s{next(self._ids)}")
            self.sessions[sess.id] = sess
        elif self.lose_unstarted:
            # The socket before is gone: forget now, not only in its handler's cleanup below,
            # which may run after this one has attached (then it skips the cleanup) when the
            # client reconnects faster than the old close is processed.
            self._lose_unstarted(sess)
        sess.ws, sess.detached_at = ws, None
        # Every stream waits for its resume on this socket, also when the socket before has not
        # finished closing (its handler may still be replaying, so its cleanup below is skipped).
        for st in sess.streams.values():
            st.attached = False
        await ws.send(P.encode(P.session_frame(sess.id, self.resume_ttl, resumed=resumed)))
        try:
            async for raw in ws:
                await self._on_frame(sess, P.decode(raw), ws)
        except Exception:
            pass
        finally:
            if self.close_delay:
                await asyncio.sleep(self.close_delay)
            if sess.ws is ws:
                sess.ws, sess.detached_at = None, time.monotonic()
                for st in sess.streams.values():
                    st.attached = False
                if self.lose_unstarted:
                    self._lose_unstarted(sess)

    def _lose_unstarted(self, sess: FakeSession) -> None:
        for sid in [k for k, st in sess.streams.items() if not st.frames]:
            sess.streams.pop(sid).task.cancel()

    def _drop_session(self, sess: FakeSession) -> None:
        for st in sess.streams.values():
            if st.task:
                st.task.cancel()
        self.sessions.pop(sess.id, None)

    async def _on_frame(self, sess: FakeSession, f: dict, ws: ServerConnection) -> None:
        self.received.append(f)
        t, sid = f["type"], f["id"]
        if t in (P.CHAT, P.COMPLETE):
            if sid in sess.streams:
                await self._send(sess, P.error_frame(sid, P.INVALID_REQUEST, "duplicate id"))
                return
            content = f["messages"][-1]["content"] if t == P.CHAT else f["prompt"]
            if content in self.errors:
                await self._send(sess, {"type": P.ERROR, "id": sid, **self.errors[content]})
                return
            params = f.get("params", {})
            st = FakeStream(sid)
            sess.streams[sid] = st
            st.task = asyncio.ensure_future(
                self._generate(sess, st, content, params.get("max_tokens", 8), params.get("n", 1))
            )
        elif t == P.RESUME:
            st = sess.streams.get(sid)
            if st is None:
                await self._send(sess, P.error_frame(sid, P.NOT_FOUND, f"no stream {sid}"))
                return
            after = 0 if self.replay_everything else f["after"]
            async with sess.lock:  # replay, then live: nothing interleaves
                # A frame _generate appends while we replay (it waits for the lock to send) is
                # not in this snapshot: sent_upto must not claim it, or nobody ever sends it.
                replay = list(st.frames)
                for fr in replay:
                    if fr["seq"] > after and sess.ws is ws:
                        await self._send(sess, fr)
                # Live only if this socket is still the session's: one that dropped during the
                # replay must leave the stream detached until the next socket resumes it.
                if sess.ws is ws:
                    st.sent_upto = replay[-1]["seq"] if replay else 0
                    st.attached = True
        elif t == P.CANCEL:
            st = sess.streams.get(sid)
            if st is not None and not st.finished and st.task:
                st.task.cancel()
                st.finished = True
                fr = P.done_frame(sid, len(st.frames) + 1, "cancelled", 3, len(st.frames))
                await self._emit(sess, st, fr)

    async def _generate(
        self, sess: FakeSession, st: FakeStream, content: str, max_tokens: int, n: int
    ) -> None:
        await asyncio.sleep(self.first_delay)
        seq = 0
        for index, text in expected_chunks(content, max_tokens, n):
            await asyncio.sleep(self.interval)
            seq += 1
            fr = P.delta_frame(st.id, seq, text, index, token_ids=[seq])
            await self._emit(sess, st, fr, skip=seq == self.skip_seq)
        st.finished = True
        await self._emit(sess, st, P.done_frame(st.id, seq + 1, "length", 3, max_tokens * n))

    async def _emit(self, sess: FakeSession, st: FakeStream, fr: dict, skip: bool = False) -> None:
        st.frames.append(fr)
        async with sess.lock:
            if st.attached and fr["seq"] > st.sent_upto:
                st.sent_upto = fr["seq"]
                if not skip:
                    await self._send(sess, fr)


@pytest.fixture
def gw():
    with FakeGateway() as g:
        yield g


def msgs(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


async def collect(stream) -> tuple[str, list[int]]:
    text, seqs = [], []
    async for d in stream:
        text.append(d.text)
        seqs.append(d.seq)
    return "".join(text), seqs


# ---- tests -----------------------------------------------------------------------------------


def test_import_does_not_pull_torch():
    code = (
        "import sys, asyncllm.client; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'asyncllm.engine' not in sys.modules, 'engine imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.anyio
async def test_chat_streams_text_seq_usage(gw):
    async with Client(gw.url(), **FAST) as client:
        stream = client.chat(msgs("hi"), max_tokens=5, return_token_ids=True)
        deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas) == expected_text("hi", 5)
    assert [d.seq for d in deltas] == [1, 2, 3, 4, 5]
    assert [d.token_ids for d in deltas] == [[1], [2], [3], [4], [5]]
    assert stream.finish_reason == "length"
    assert stream.usage.completion_tokens == 5 and stream.usage.prompt_tokens == 3
    sent = [f for f in gw.received if f["type"] == P.CHAT][0]
    assert sent["params"] == {"max_tokens": 5, "return_token_ids": True}
    assert sent["messages"] == msgs("hi")


@pytest.mark.anyio
async def test_text_and_complete(gw):
    async with Client(gw.url(), **FAST) as client:
        reply = await client.chat(msgs("a"), max_tokens=4).text()
        comp = client.complete("Once upon a time", max_tokens=3)
        assert await comp.text() == expected_text("Once upon a time", 3)
    assert reply == expected_text("a", 4)
    assert comp.finish_reason == "length"
    assert [f for f in gw.received if f["type"] == P.COMPLETE][0]["prompt"] == "Once upon a time"


@pytest.mark.anyio
async def test_n_choices_kept_apart(gw):
    async with Client(gw.url(), **FAST) as client:
        stream = client.chat(msgs("n"), max_tokens=4, n=3)
        per_index: dict[int, str] = {0: "", 1: "", 2: ""}
        async for d in stream:
            per_index[d.index] += d.text
        assert await stream.texts() == [expected_text("n", 4, i, 3) for i in range(3)]
        assert await stream.text(2) == expected_text("n", 4, 2, 3)
    assert per_index == {i: expected_text("n", 4, i, 3) for i in range(3)}


@pytest.mark.anyio
async def test_200_concurrent_chats_one_socket(gw):
    results: dict[int, str] = {}
    async with Client(gw.url(), **FAST) as client:

        async def one(i: int) -> None:
            results[i] = await client.chat(msgs(f"c{i}"), max_tokens=6).text()

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert results == {i: expected_text(f"c{i}", 6) for i in range(200)}
    assert gw.connections == 1


@pytest.mark.anyio
async def test_bad_params_raise_before_sending(gw):
    async with Client(gw.url(), **FAST) as client:
        with pytest.raises(ValueError, match="temperature"):
            client.chat(msgs("x"), temperature=-1)
        with pytest.raises(ValueError, match="unknown params"):
            client.chat(msgs("x"), max_token=3)
        with pytest.raises(ValueError, match="messages"):
            client.chat([])
        with pytest.raises(ValueError, match="prompt"):
            client.complete("")
        with pytest.raises(ValueError, match="bytes"):  # past the gateway's frame limit
            client.complete("x" * (1 << 20))
    assert not [f for f in gw.received if f["type"] in (P.CHAT, P.COMPLETE)]
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1/v1/ws")


@pytest.mark.anyio
async def test_error_frames_map_to_exceptions(gw):
    gw.errors = {
        "big": {"code": P.TOO_LARGE, "message": "prompt too long"},
        "busy": {"code": P.OVERLOADED, "message": "queue full", "retry_after": 2},
        "who": {"code": P.UNAUTHORIZED, "message": "nope"},
    }
    async with Client(gw.url(), **FAST) as client:
        with pytest.raises(ServerError) as ei:
            await client.chat(msgs("big")).text()
        assert ei.value.code == P.TOO_LARGE and "prompt too long" in str(ei.value)
        with pytest.raises(Overloaded) as eo:
            await client.chat(msgs("busy")).text()
        assert eo.value.retry_after == 2
        with pytest.raises(AuthError):
            await client.chat(msgs("who")).text()
        # an error about one stream touches no other
        assert await client.chat(msgs("ok"), max_tokens=2).text() == expected_text("ok", 2)
    assert gw.connections == 1


@pytest.mark.anyio
async def test_auth_rejected_handshake(gw):
    gw.api_keys = ("good",)
    with pytest.raises(AuthError):
        async with Client(gw.url(), api_key="bad", **FAST):
            pass
    async with Client(gw.url(), api_key="good", **FAST) as client:
        assert await client.chat(msgs("k"), max_tokens=2).text() == expected_text("k", 2)


@pytest.mark.anyio
async def test_overloaded_handshake_retries_then_raises(gw):
    gw.reject_status = 503
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        async with Client(gw.url(), reconnect_attempts=3, backoff_initial=0.01, backoff_max=0.02):
            pass
    assert gw.connections == 0 and time.monotonic() - t0 < 5


@pytest.mark.anyio
async def test_unreachable_server_raises_connection_failed():
    with anyio.fail_after(10):
        with pytest.raises(ConnectionFailed):
            async with Client("ws://127.0.0.1:9/v1/ws", reconnect_attempts=3, backoff_initial=0.01):
                pass


@pytest.mark.anyio
async def test_cancel_and_break_cancel_on_server(gw):
    gw.interval = 0.02
    async with Client(gw.url(), **FAST) as client:
        stream = client.chat(msgs("long"), max_tokens=500)
        async for _ in stream:
            break  # leaving early cancels on the server
        s2 = client.chat(msgs("long2"), max_tokens=500)
        await anyio.sleep(0.05)
        await s2.cancel()
        assert s2.finish_reason == "cancelled"
        assert [d async for d in s2] == []
        await anyio.sleep(0.1)
    cancels = {f["id"] for f in gw.received if f["type"] == P.CANCEL}
    assert {stream.id, s2.id} <= cancels


@pytest.mark.anyio
async def test_drop_mid_stream_resumes_without_loss_or_duplicates(gw):
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            stream = client.chat(msgs("r"), max_tokens=40, return_token_ids=True)
            got = []
            async for d in stream:
                got.append(d)
                if len(got) in (5, 15, 25):
                    proxy.drop_all()
        assert client.reconnects == 3
    assert "".join(d.text for d in got) == expected_text("r", 40)
    assert [d.seq for d in got] == list(range(1, 41))
    resumes = [f for f in gw.received if f["type"] == P.RESUME]
    assert len(resumes) == 3 and all(f["after"] > 0 for f in resumes)


@pytest.mark.anyio
async def test_replayed_deltas_are_not_delivered_twice(gw):
    gw.replay_everything = True  # the server replays from seq 1 on every resume
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            got = []
            async for d in client.chat(msgs("d"), max_tokens=30):
                got.append(d)
                if len(got) in (10, 20):
                    proxy.drop_all()
    assert [d.seq for d in got] == list(range(1, 31))
    assert "".join(d.text for d in got) == expected_text("d", 30)


@pytest.mark.anyio
async def test_gap_raises_stream_lost_with_partial_text(gw):
    gw.skip_seq = 4
    async with Client(gw.url(), **FAST) as client:
        stream = client.chat(msgs("g"), max_tokens=8)
        with pytest.raises(StreamLost, match="never arrived") as ei:
            await collect(stream)
    assert ei.value.text == "".join(t for _, t in expected_chunks("g", 8)[:3])


@pytest.mark.anyio
async def test_session_expiry_while_disconnected_raises_stream_lost(gw):
    gw.interval = 0.01
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            s1 = client.chat(msgs("e1"), max_tokens=200)
            s2 = client.chat(msgs("e2"), max_tokens=200)
            got = []
            async for d in s1:
                got.append(d.text)
                if len(got) == 5:
                    proxy.refusing = True
                    proxy.drop_all()
                    gw.expire_all()  # the server's TTL ran out meanwhile
                    proxy.refusing = False
                    break_after = True
                    break
            assert break_after
            # s1 was left by `break` (cancelled); s2 is open and must raise StreamLost
            with pytest.raises(StreamLost, match="session expired") as ei:
                await s2.text()
            assert ei.value.text == s2.received_text()
            assert ei.value.text.startswith("e2/0-0 ")
            assert client.sessions_lost == 1
            # the client keeps working on its new session
            assert await client.chat(msgs("after"), max_tokens=3).text() == expected_text(
                "after", 3
            )


@pytest.mark.anyio
async def test_session_expiry_partial_text_is_exact(gw):
    gw.interval = 0.01
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            stream = client.chat(msgs("p"), max_tokens=200)
            got: list[str] = []
            with pytest.raises(StreamLost) as ei:
                async for d in stream:
                    got.append(d.text)
                    if len(got) == 7:
                        proxy.refusing = True
                        proxy.drop_all()
                        gw.expire_all()
                        proxy.refusing = False
    assert ei.value.text == "".join(got)
    assert ei.value.text.startswith(expected_text("p", 7))


@pytest.mark.anyio
async def test_chat_started_while_disconnected_is_sent_after_reconnect(gw):
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            proxy.refusing = True
            proxy.drop_all()
            with anyio.fail_after(5):
                while client.connected:
                    await anyio.sleep(0.005)
            stream = client.chat(msgs("w"), max_tokens=4)
            await anyio.sleep(0.02)
            proxy.refusing = False
            assert await stream.text() == expected_text("w", 4)


@pytest.mark.anyio
@pytest.mark.parametrize("close_delay", [0.0, 0.1])
async def test_start_frame_lost_is_resent(gw, close_delay):
    """The server lost a chat it had not started when the socket dropped: the client's resume
    gets not_found and it sends the chat again. close_delay: the server processes the old
    socket's close after the reconnect (the race that made this test flaky on a loaded machine:
    the fake server forgot the stream only in the old socket's cleanup, which the new socket had
    already overtaken)."""
    gw.close_delay = close_delay
    gw.lose_unstarted = True
    gw.first_delay = 0.5  # the drop must come before the first delta, also on a loaded machine
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            stream = client.chat(msgs("lost"), max_tokens=4)
            # the server has the chat but no delta yet (waiting for it, not a fixed sleep: on a
            # loaded machine the frame can take longer than any sleep to get through the proxy)
            with anyio.fail_after(10):
                while not [f for f in gw.received if f["type"] == P.CHAT]:
                    await anyio.sleep(0.005)
            proxy.drop_all()  # ... and forgets it
            assert await stream.text() == expected_text("lost", 4)
    chats = [f for f in gw.received if f["type"] == P.CHAT]
    resumes = [f for f in gw.received if f["type"] == P.RESUME]
    assert len(chats) == 2 and resumes == [{"type": P.RESUME, "id": stream.id, "after": 0}]


@pytest.mark.anyio
async def test_random_drops_and_handshake_cuts(gw):
    plan = random_plan(seed=7, p_handshake=0.3, p_drop=0.6, down=(200, 1500))
    with FaultProxy(gw.port, plan=plan) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            out: dict[int, tuple[str, list[int]]] = {}

            async def one(i: int) -> None:
                out[i] = await collect(client.chat(msgs(f"x{i}"), max_tokens=25))

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(one, i)
        assert proxy.cuts >= 5 and proxy.handshake_cuts >= 1
    for i in range(30):
        assert out[i] == (expected_text(f"x{i}", 25), list(range(1, 26)))


@pytest.mark.anyio
async def test_handshake_cut_every_way(gw):
    """Cut at every byte offset of the upgrade exchange in turn: the client always gets through."""
    cuts = [Cut(up=k) for k in (0, 1, 50)] + [Cut(down=k) for k in (0, 1, 12, 60, 110)]
    with FaultProxy(gw.port, plan=lambda i: cuts[i] if i < len(cuts) else None) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            assert await client.chat(msgs("h"), max_tokens=3).text() == expected_text("h", 3)
        assert proxy.connections == len(cuts) + 1


@pytest.mark.anyio
async def test_reconnect_budget_exhausted_raises_stream_lost(gw):
    with FaultProxy(gw.port) as proxy:
        async with Client(
            proxy.url(), reconnect_attempts=2, backoff_initial=0.01, backoff_max=0.02
        ) as client:
            stream = client.chat(msgs("z"), max_tokens=100000)
            async for _ in stream:
                break_now = True
                proxy.refusing = True
                proxy.drop_all()
                break
            assert break_now
            s2 = client.chat(msgs("z2"), max_tokens=5)
            with pytest.raises((StreamLost, ConnectionFailed)):
                await s2.text()
            proxy.refusing = False
            # a later chat reconnects
            assert await client.chat(msgs("z3"), max_tokens=2).text() == expected_text("z3", 2)


@pytest.mark.anyio
async def test_closed_client(gw):
    client = Client(gw.url(), **FAST)
    with pytest.raises(ClientClosed):
        client.chat(msgs("x"))
    async with client:
        gw.interval = 0.05
        stream = client.chat(msgs("open"), max_tokens=100)
        await anyio.sleep(0.02)
    with pytest.raises(ClientClosed):
        await stream.text()


def test_sync_client(gw):
    with SyncClient(gw.url(), **FAST) as client:
        s = client.chat(msgs("sync"), max_tokens=3)
        assert "".join(d.text for d in s) == expected_text("sync", 3)
        assert s.finish_reason == "length"
        assert client.complete("p", max_tokens=2).text() == expected_text("p", 2)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_example_bot_answers_stdin_lines(gw, backend):
    out = subprocess.run(
        [sys.executable, "examples/bot.py", "--url", gw.url(), "--max-tokens", "3"]
        + ["--temperature", "0", "--backend", backend],
        input="hello\n\nworld\n",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == ["bot> " + expected_text("hello", 3), "bot> " + expected_text("world", 3)]
    chats = [f for f in gw.received if f["type"] == P.CHAT]
    # the second chat carries the conversation: system, user, the bot's reply, user
    assert [m["role"] for m in chats[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert chats[1]["messages"][2]["content"] == expected_text("hello", 3)


@pytest.mark.anyio
async def test_keepalive_detects_a_silent_socket(gw):
    gw.interval = 0.01
    with FaultProxy(gw.port) as proxy:
        async with Client(proxy.url(), **FAST, ping_interval=0.1, ping_timeout=0.2) as client:
            got = []
            with anyio.fail_after(10):
                async for d in client.chat(msgs("ka"), max_tokens=60):
                    got.append(d)
                    if len(got) == 5:
                        proxy.freeze_all()  # open but silent: no EOF will ever come
            assert client.reconnects == 1
    assert [d.seq for d in got] == list(range(1, 61))
    assert "".join(d.text for d in got) == expected_text("ka", 60)


def test_reconnect_backoff_is_capped_exponential_with_full_jitter():
    from types import SimpleNamespace

    from asyncllm.client.client import _Retryable

    c = Client("ws://127.0.0.1:1/v1/ws", backoff_initial=0.1, backoff_max=1.0)

    def waits(attempt: int, exc: BaseException | None = None, k: int = 400) -> list[float]:
        outcome = None if exc is None else SimpleNamespace(exception=lambda: exc)
        state = SimpleNamespace(attempt_number=attempt, outcome=outcome)
        return [c._wait(state) for _ in range(k)]

    for attempt, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (20, 1.0)):
        w = waits(attempt)
        assert all(0 <= x <= cap for x in w), attempt
        # full jitter: spread over [0, cap], not clustered at the cap
        assert min(w) < 0.1 * cap and max(w) > 0.9 * cap and len(set(w)) > 300, attempt
    # a server's Retry-After is a floor (bounded by the larger of backoff_max and 1 s)
    assert min(waits(1, _Retryable(RuntimeError("busy"), retry_after=0.7))) >= 0.7
    assert max(waits(1, _Retryable(RuntimeError("busy"), retry_after=60))) <= 1.0
