"""The WebSocket gateway against a real uvicorn on 127.0.0.1, with a fake engine (so the session,
resume and limit logic is tested apart from the model; test_gateway_engine.py uses the real one)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from asyncllm.gateway import GatewaySettings
from asyncllm.protocol import CLOSE_OVERLOADED, CLOSE_SESSION_TAKEN, CLOSE_UNAUTHORIZED
from tests.gateway_helpers import WS, CharTokenizer, FakeEngine, fake_text, run_server

MSG = [{"role": "user", "content": "hello"}]


def chat_ids(messages) -> list[int]:
    tok = CharTokenizer()
    return tok.encode(tok.apply_chat_template(messages))


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(step_s=0.004)
    with run_server(engine, GatewaySettings(resume_ttl=5, max_frame_bytes=4096)) as srv:
        yield engine, srv


def seqs_ok(frames: list[dict]) -> bool:
    return [f["seq"] for f in frames] == list(range(1, len(frames) + 1))


@pytest.mark.parametrize("batch", [False, True])
def test_many_streams_interleaved_one_cancelled(fake, batch):
    engine, srv = fake
    ws = WS(srv.ws_url("batch=1" if batch else ""))
    assert ws.session.get("batch", False) is batch
    ids = [f"s{i}" for i in range(5)]
    for i, sid in enumerate(ids):
        prompt = f"prompt {i}"
        max_tokens = 400 if sid == "s2" else 20 + i
        ws.send(
            {"type": "complete", "id": sid, "prompt": prompt, "params": {"max_tokens": max_tokens}}
        )
    ws.until(lambda f: f["type"] == "delta" and f["id"] == "s2")
    ws.send({"type": "cancel", "id": "s2"})
    ws.until_done(ids)
    for i, sid in enumerate(ids):
        frames = ws.of(sid)
        assert seqs_ok(frames), frames
        done = ws.done(sid)
        if sid == "s2":
            assert done["finish_reason"] == "cancelled"
            assert len(ws.text(sid)) < 400
            continue
        assert ws.text(sid) == fake_text(CharTokenizer().encode(f"prompt {i}"), 0, 20 + i)
        assert done["finish_reason"] == "length"
        assert done["usage"] == {"prompt_tokens": len(f"prompt {i}"), "completion_tokens": 20 + i}
    # Streams really interleaved on the one socket.
    order = [f["id"] for f in ws.frames if f["type"] == "delta"]
    assert order != sorted(order, key=ids.index)
    if not batch:
        assert not ws.batches and ws.messages == len(ws.frames)
    assert wait_for(lambda: not engine.active)
    ws.close()


def test_chat_n_and_token_ids(fake):
    _, srv = fake
    ws = WS(srv.ws_url())
    ws.send(
        {
            "type": "chat",
            "id": 1,
            "messages": MSG,
            "params": {"max_tokens": 6, "n": 2, "return_token_ids": True},
            "model": "fake-model",
        }
    )
    ws.until_done([1])
    ids = chat_ids(MSG)
    for k in range(2):
        assert ws.text(1, k) == fake_text(ids, k, 6)
        toks = [t for f in ws.of(1, "delta") if f["index"] == k for t in f["token_ids"]]
        assert toks == [ord(c) for c in fake_text(ids, k, 6)]
    assert ws.done(1)["finish_reasons"] == ["length", "length"]
    ws.close()


@pytest.mark.parametrize("batch", [False, True])
def test_resume_after_drop_is_exact(fake, batch):
    engine, srv = fake
    q = "batch=1&" if batch else ""
    ws = WS(srv.ws_url(q.rstrip("&")))
    key = ws.session["session"]
    ws.send({"type": "complete", "id": "r", "prompt": "resume me", "params": {"max_tokens": 150}})
    seen = [ws.until(lambda f: f["type"] == "delta") for _ in range(5)]
    # The socket goes away without a close handshake (as a dropped network would).
    ws.conn.socket.shutdown(socket.SHUT_RDWR)
    ws.conn.socket.close()
    time.sleep(0.15)  # output piles up while detached
    ws2 = WS(srv.ws_url(f"{q}session={key}"))
    assert ws2.session["session"] == key
    # Claim one frame fewer than seen: a frame in flight when the socket died.
    after = seen[-1]["seq"] - 1
    ws2.send({"type": "resume", "id": "r", "after": after})
    ws2.until_done(["r"])
    got = [f for f in ws.frames if f.get("id") == "r"][:after] + ws2.of("r")
    assert seqs_ok(got), [f["seq"] for f in got]
    text = "".join(f["text"] for f in got if f["type"] == "delta")
    assert text == fake_text(CharTokenizer().encode("resume me"), 0, 150)
    # What piled up while detached came coalesced, not one frame per token.
    assert any(len(f["text"]) > 1 for f in ws2.of("r", "delta"))
    # The replayed frame and the coalesced delta were due together: one message if batching.
    assert bool(ws2.batches) is batch
    assert got[-1]["type"] == "done" and got[-1]["usage"]["completion_tokens"] == 150
    # Resuming a finished stream again replays its tail (here: just the done).
    ws2.send({"type": "resume", "id": "r", "after": got[-2]["seq"]})
    d = ws2.until(lambda f: f.get("id") == "r")
    assert d["type"] == "done" and d["seq"] == got[-1]["seq"]
    ws2.close()
    assert wait_for(lambda: not engine.active)


def test_ttl_cancels_and_frees():
    engine = FakeEngine(step_s=0.01)
    with run_server(engine, GatewaySettings(resume_ttl=0.3)) as srv:
        ws = WS(srv.ws_url())
        key = ws.session["session"]
        ws.send({"type": "complete", "id": "t", "prompt": "long", "params": {"max_tokens": 1000}})
        ws.until(lambda f: f["type"] == "delta")
        assert engine.active
        ws.close()
        assert wait_for(lambda: not engine.active, 3)
        assert wait_for(lambda: not srv.app.state.sessions.sessions, 3)
        ws2 = WS(srv.ws_url(f"session={key}"))
        # a new, empty session under the same key (it is the key's replica), said to be new
        assert ws2.session["session"] == key and ws2.session["resumed"] is False
        ws2.send({"type": "resume", "id": "t", "after": 0})
        err = ws2.until(lambda f: f["type"] == "error")
        assert err["code"] == "not_found" and err["id"] == "t"
        ws2.close()


def test_takeover_closes_the_old_socket(fake):
    _, srv = fake
    ws = WS(srv.ws_url())
    ws2 = WS(srv.ws_url(f"session={ws.session['session']}"))
    with pytest.raises(ConnectionClosed) as ei:
        ws.recv(5)
    assert ei.value.rcvd.code == CLOSE_SESSION_TAKEN
    ws2.send({"type": "complete", "id": 1, "prompt": "x", "params": {"max_tokens": 2}})
    ws2.until_done([1])
    ws2.close()


BAD_FRAMES = [
    # (frame, code, id, a done(error) follows)
    ("not json", "invalid_request", None, False),
    (
        {"type": "chat", "id": "w", "messages": MSG, "params": {"max_tokens": "x"}},
        "invalid_request",
        "w",
        True,
    ),
    ({"type": "teleport", "id": "u"}, "invalid_request", "u", False),
    ({"type": "chat", "id": "m"}, "invalid_request", "m", True),
    (
        {"type": "chat", "id": "n", "messages": MSG, "params": {"max_tokens": -5}},
        "invalid_request",
        "n",
        True,
    ),
    ({"type": "chat", "id": "o", "messages": MSG, "model": "gpt-9"}, "not_found", "o", True),
    ({"type": "complete", "id": "h", "prompt": "x" * 5000}, "too_large", None, False),
    ({"type": "cancel", "id": "ghost"}, "not_found", "ghost", False),
    ({"type": "resume", "id": "ghost", "after": 0}, "not_found", "ghost", False),
    (
        {"type": "chat", "id": "p", "messages": MSG, "params": {"top_p": 0}},
        "invalid_request",
        "p",
        True,
    ),
    ({"type": "complete", "id": "q", "prompt": [1, 99999]}, "invalid_request", "q", True),
]


@pytest.mark.parametrize(("frame", "code", "id", "has_done"), BAD_FRAMES)
def test_bad_frames_get_errors_and_the_socket_goes_on(fake, frame, code, id, has_done):
    _, srv = fake
    ws = WS(srv.ws_url())
    ws.send({"type": "complete", "id": "ok", "prompt": "fine", "params": {"max_tokens": 30}})
    ws.send(frame)
    err = ws.until(lambda f: f["type"] == "error")
    assert err["code"] == code and err["id"] == id, err
    if has_done:
        d = ws.until(lambda f: f["type"] == "done" and f["id"] == id)
        assert d["finish_reason"] == "error" and d["error"]["code"] == code and d["seq"] == 1
    ws.until_done(["ok"])
    assert ws.text("ok") == fake_text(CharTokenizer().encode("fine"), 0, 30)
    ws.close()


def test_frame_far_over_the_limit_closes_only_its_socket(fake):
    """Up to 4x --max-frame-bytes a frame gets too_large (above); far beyond, the socket is
    closed with 1009 without the frame being read into the app. Other sockets go on."""
    _, srv = fake
    other = WS(srv.ws_url())
    other.send({"type": "complete", "id": "ok", "prompt": "fine", "params": {"max_tokens": 30}})
    ws = WS(srv.ws_url())
    huge = {"type": "complete", "id": "huge", "prompt": "x" * (1 << 17)}  # > max(4 x 4096, 64 KiB)
    ws.send(huge)
    with pytest.raises(ConnectionClosed) as ei:
        while True:
            ws.recv(5)
    assert ei.value.rcvd.code == 1009
    assert not [f for f in ws.frames if f.get("id") == "huge"]
    other.until_done(["ok"])
    assert other.text("ok") == fake_text(CharTokenizer().encode("fine"), 0, 30)
    other.close()
    again = WS(srv.ws_url())  # the server keeps accepting sockets
    again.close()


def test_duplicate_id_leaves_the_running_stream_alone(fake):
    _, srv = fake
    ws = WS(srv.ws_url())
    ws.send({"type": "complete", "id": "d", "prompt": "dup", "params": {"max_tokens": 30}})
    ws.send({"type": "complete", "id": "d", "prompt": "other", "params": {"max_tokens": 3}})
    err = ws.until(lambda f: f["type"] == "error")
    assert err["code"] == "invalid_request" and err["id"] == "d"
    ws.until_done(["d"])
    assert ws.text("d") == fake_text(CharTokenizer().encode("dup"), 0, 30)
    ws.close()


def test_limits():
    engine = FakeEngine(step_s=0.02)
    s = GatewaySettings(
        max_streams_per_connection=2, max_connections=2, max_prompt_tokens=10, max_queue=100
    )
    with run_server(engine, s) as srv:
        ws = WS(srv.ws_url())
        for i in range(3):
            ws.send({"type": "complete", "id": i, "prompt": "p", "params": {"max_tokens": 10}})
        err = ws.until(lambda f: f["type"] == "error")
        assert err["code"] == "overloaded" and err["id"] == 2
        ws.until_done([0, 1, 2])
        assert ws.done(2)["error"]["code"] == "overloaded"
        ws.send({"type": "complete", "id": "big", "prompt": "x" * 11})
        err = ws.until(lambda f: f["type"] == "error")
        assert err["code"] == "too_large" and err["id"] == "big"
        ws.until_done(["big"])

        ws2 = WS(srv.ws_url())
        with pytest.raises((ConnectionClosed, AssertionError)):
            ws3 = WS(srv.ws_url())
        # The refused socket got an error frame, then close code 1013.
        raw = _raw_frames(srv, b"")
        assert raw[1]["code"] == "overloaded" and raw[1]["id"] is None
        assert raw[-1] == {"close": CLOSE_OVERLOADED}
        ws.close()
        ws2.close()
        assert wait_for(lambda: srv.app.state.io.limits.connections == 0)
        ws3 = WS(srv.ws_url())  # a slot is free again
        ws3.close()


def test_queue_limit():
    # the first token is slow: requests stay queued (for 1 s: 0.3 s was sometimes over before
    # the HTTP request below on a loaded 2-core machine)
    engine = FakeEngine(step_s=1.0)
    with run_server(engine, GatewaySettings(max_queue=1)) as srv:
        ws = WS(srv.ws_url())
        ws.send({"type": "complete", "id": 1, "prompt": "p", "params": {"max_tokens": 1}})
        assert wait_for(lambda: srv.app.state.io.limits.queued == 1)
        ws.send({"type": "complete", "id": 2, "prompt": "p", "params": {"max_tokens": 1}})
        err = ws.until(lambda f: f["type"] == "error")
        assert err["code"] == "overloaded" and err["id"] == 2
        r = httpx.post(srv.http + "/v1/completions", json={"prompt": "p", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        ws.until_done([1, 2])
        ws.close()


def _raw_frames(srv, extra_headers: bytes, path: bytes = b"/v1/ws") -> list[dict]:
    """A hand-made upgrade (so no client pongs or checks get in the way): the text frames read
    until the server closes, with the close code appended as {"close": code}."""
    s = socket.create_connection((srv.host, srv.port), timeout=5)
    key = base64.b64encode(os.urandom(16))
    s.sendall(
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: "
        + f"{srv.host}:{srv.port}".encode()
        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n"
        + extra_headers
        + b"\r\n"
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, buf = buf.split(b"\r\n\r\n", 1)
    out: list[dict] = [{"status": int(head.split()[1])}]
    try:
        while True:
            while len(buf) < 2:
                chunk = s.recv(4096)
                if not chunk:
                    return out
                buf += chunk
            op, ln = buf[0] & 0x0F, buf[1] & 0x7F
            hdr = 2
            if ln == 126:
                ln, hdr = int.from_bytes(buf[2:4], "big"), 4
            while len(buf) < hdr + ln:
                buf += s.recv(4096)
            payload, buf = buf[hdr : hdr + ln], buf[hdr + ln :]
            if op == 1:
                out.append(orjson.loads(payload))
            elif op == 9:
                out.append({"ping": True})
                return out
            elif op == 8:
                out.append({"close": int.from_bytes(payload[:2], "big")})
                return out
    finally:
        s.close()


def test_refusals_are_frames_and_close_codes():
    engine = FakeEngine()
    s = GatewaySettings(api_keys=("k1", "k2"), allowed_origins=("https://good.example",))
    with run_server(engine, s) as srv:
        # no key, wrong key: an error frame, then close 4401
        for hdr in (b"", b"Authorization: Bearer nope\r\n"):
            f = _raw_frames(srv, hdr)
            assert f[0]["status"] == 101
            assert f[1]["code"] == "unauthorized" and f[-1] == {"close": CLOSE_UNAUTHORIZED}
        # good key as a header or in the query
        ws = WS(srv.ws_url(), additional_headers={"Authorization": "Bearer k2"})
        ws.close()
        ws = WS(srv.ws_url("api_key=k1"))
        ws.send({"type": "complete", "id": 1, "prompt": "x", "params": {"max_tokens": 2}})
        ws.until_done([1])
        ws.close()
        # origins: a foreign one is refused at the handshake, listed and same-origin pass
        with pytest.raises(InvalidStatus) as ei:
            WS(srv.ws_url("api_key=k1"), origin="https://evil.example")
        assert ei.value.response.status_code == 403
        WS(srv.ws_url("api_key=k1"), origin="https://good.example").close()
        WS(srv.ws_url("api_key=k1"), origin=f"http://{srv.host}:{srv.port}").close()
        # HTTP: 401 without a key, /health needs none, 403 for a foreign origin
        assert httpx.get(srv.http + "/v1/models").status_code == 401
        r = httpx.get(srv.http + "/v1/models", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake-model"
        r = httpx.get(srv.http + "/metrics", headers={"Authorization": "Bearer bad"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(srv.http + "/health").status_code == 200
        r = httpx.get(
            srv.http + "/v1/models",
            headers={"Authorization": "Bearer k1", "Origin": "https://evil.example"},
        )
        assert r.status_code == 403


def test_server_pings():
    with run_server(FakeEngine(), GatewaySettings(ws_ping_interval=0.1)) as srv:
        frames = _raw_frames(srv, b"")
        assert frames[1]["type"] == "session" and frames[-1] == {"ping": True}


def test_engine_dead():
    engine = FakeEngine(step_s=0.01)
    with run_server(engine, GatewaySettings()) as srv:
        ws = WS(srv.ws_url())
        ws.send({"type": "complete", "id": 1, "prompt": "x", "params": {"max_tokens": 500}})
        ws.until(lambda f: f["type"] == "delta")
        engine.errored = True
        err = ws.until(lambda f: f["type"] == "error")
        assert err["id"] == 1 and err["code"] == "internal"
        assert ws.until(lambda f: f["type"] == "done")["finish_reason"] == "error"
        ws.send({"type": "complete", "id": 2, "prompt": "x"})
        assert ws.until(lambda f: f["type"] == "error")["code"] == "internal"
        r = httpx.get(srv.http + "/health")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        r = httpx.post(srv.http + "/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "asyncllm_engine_alive 0.0" in httpx.get(srv.http + "/metrics").text
        ws.close()
    assert engine.started and engine.stopped  # the lifespan started and stopped the engine


def test_metrics(fake):
    engine, srv = fake
    ws = WS(srv.ws_url())
    ws.send({"type": "complete", "id": 1, "prompt": "x", "params": {"max_tokens": 5}})
    ws.send({"type": "cancel", "id": "nobody"})
    ws.until_done([1])
    text = httpx.get(srv.http + "/metrics").text
    for name in (
        'asyncllm_errors_total{api="ws",code="not_found"}',
        "asyncllm_requests_total",
        "asyncllm_prompt_tokens_total",
        "asyncllm_generation_tokens_total",
        "asyncllm_time_to_first_token_seconds_bucket",
        "asyncllm_inter_token_latency_seconds_bucket",
        "asyncllm_num_requests_running",
        "asyncllm_num_requests_waiting",
        "asyncllm_kv_blocks_used",
        "asyncllm_open_websockets 1.0",
        "asyncllm_open_streams",
    ):
        assert name in text, name
    ws.close()


def test_ui_page(tmp_path):
    page = tmp_path / "chat.html"
    page.write_text("<html>chat</html>")
    with run_server(FakeEngine(), GatewaySettings(ui_file=str(page), api_keys=("k",))) as srv:
        r = httpx.get(srv.http + "/")
        assert r.status_code == 200 and "chat" in r.text
    with run_server(FakeEngine(), GatewaySettings(ui_file=str(page), ui=False)) as srv:
        assert httpx.get(srv.http + "/").status_code == 404


# ---- fuzzing through a live socket -------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
fuzz_frames = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(["chat", "complete", "cancel", "resume", "x"])},
        optional={
            "id": st.text(max_size=4) | st.integers(-5, 5) | json_values,
            "messages": json_values,
            "prompt": json_values,
            "params": st.dictionaries(
                st.sampled_from(["max_tokens", "n", "temperature", "stop", "top_p", "seed", "x"]),
                json_values,
                max_size=3,
            ),
            "after": json_values,
        },
    )
    | json_values
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=fuzz_frames)
def test_fuzz_live_socket(fake, frame):
    _, srv = fake
    ws = WS(srv.ws_url())
    try:
        if isinstance(frame, dict) and isinstance(frame.get("params"), dict):
            mt = frame["params"].get("max_tokens")
            if not isinstance(mt, int) or mt > 3:
                frame["params"]["max_tokens"] = 3  # keep streams that start short
        ws.send(json.dumps(frame))  # json, not orjson: it also writes integers past 64 bits
        # The socket still answers: a cancel of an unknown id gets its not_found.
        ws.send({"type": "cancel", "id": "probe"})
        ws.until(lambda f: f["type"] == "error" and f["id"] == "probe")
        for f in ws.frames:
            assert f["type"] in ("session", "delta", "done", "error")
            if f["type"] == "error":
                assert f["code"] in ("invalid_request", "not_found", "too_large", "overloaded"), f
    finally:
        ws.close()


def test_freeze_gc_freezes_the_start_up_heap_only_when_asked():
    import gc

    gc.unfreeze()
    try:
        with run_server(FakeEngine(), GatewaySettings()):
            assert gc.get_freeze_count() == 0  # an embedding app's heap is left alone
        with run_server(FakeEngine(), GatewaySettings(freeze_gc=True)) as srv:
            assert gc.get_freeze_count() > 0
            assert httpx.get(srv.http + "/health").status_code == 200
    finally:
        gc.unfreeze()


def test_a_proposed_session_key_is_adopted_and_resumable():
    """The first connection may bring its own key (so a proxy hashing on it routes every
    connection of the session alike): a well-formed, free key becomes the session's."""
    engine = FakeEngine(step_s=0.005)
    with run_server(engine, GatewaySettings(resume_ttl=5)) as srv:
        key = "k" * 11 + "-_" + "x" * 19
        ws = WS(srv.ws_url(f"session={key}"))
        assert ws.session["session"] == key and ws.session["resumed"] is False
        ws.send({"type": "complete", "id": "p", "prompt": "propose", "params": {"max_tokens": 60}})
        first = ws.until(lambda f: f["type"] == "delta")
        ws.close()
        ws2 = WS(srv.ws_url(f"session={key}"))
        assert ws2.session == {
            "type": "session",
            "session": key,
            "resume_ttl": 5.0,
            "resumed": True,
        }
        ws2.send({"type": "resume", "id": "p", "after": first["seq"]})
        ws2.until_done(["p"])
        got = [first] + ws2.of("p")
        assert seqs_ok(got)
        text = "".join(f["text"] for f in got if f["type"] == "delta")
        assert text == fake_text(CharTokenizer().encode("propose"), 0, 60)
        ws2.close()
        # a key too short to be unguessable is not adopted
        ws3 = WS(srv.ws_url("session=short"))
        assert ws3.session["session"] != "short" and ws3.session["resumed"] is False
        ws3.close()


def test_done_leaves_with_the_last_delta_through_the_engine_sink():
    """With AsyncLLMEngine's sink the last output arrives in the engine's drain; the done frame
    must go out in the same writer pass (one batch message with the last delta), not one pass
    later when the stream's task resumes: at a wave of finishes each pass is time before the
    client can send its next request (ops/bench/NOTES.md, "Serving, third round")."""
    from websockets.sync.client import connect

    from asyncllm.bench.gateway_cost import StubLLMEngine
    from asyncllm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(engine=StubLLMEngine(0.02))
    with run_server(engine, GatewaySettings()) as srv:
        with connect(srv.ws_url("batch=1"), open_timeout=10) as conn:
            assert orjson.loads(conn.recv(timeout=10))["type"] == "session"
            for k in range(3):
                sid = f"s{k}"
                conn.send(
                    orjson.dumps(
                        {"type": "complete", "id": sid, "prompt": "hi", "params": {"max_tokens": 3}}
                    ).decode()
                )
                messages = []
                while True:
                    msg = orjson.loads(conn.recv(timeout=10))
                    frames = msg["frames"] if msg["type"] == "batch" else [msg]
                    messages.append([f["type"] for f in frames])
                    if "done" in messages[-1]:
                        break
                assert messages[-1] == ["delta", "done"], messages
