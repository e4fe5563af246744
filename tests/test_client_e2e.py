"""The client against the real gateway (build_app + uvicorn on 127.0.0.1) on the real
AsyncLLMEngine (tiny random model, CPU), through a proxy that drops connections at random points,
during the WebSocket handshake too. A flaky network must be invisible: every chat ends with the
text the undisturbed server generates, each delta delivered exactly once."""

from __future__ import annotations

import time

import anyio
import pytest

from asyncllm import protocol as P
from asyncllm.client import Client, StreamLost
from asyncllm.gateway import GatewaySettings
from tests.fault_proxy import FaultProxy, random_plan
from tests.gateway_helpers import run_server

ENGINE_ARGS = dict(num_kv_blocks=512, block_size=16, max_model_len=256, seed=0)
RESUME_TTL = 1.0
FAST = dict(reconnect_attempts=12, backoff_initial=0.01, backoff_max=0.2, connect_timeout=5.0)
PROMPTS = [f"Hello world {i}: the sky is" for i in range(25)]
GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from asyncllm import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=tiny_model_dir, **ENGINE_ARGS))
    settings = GatewaySettings(resume_ttl=RESUME_TTL, max_streams_per_connection=256)
    with run_server(engine, settings) as srv:
        yield engine, srv


def msgs(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def undisturbed(served) -> dict[str, str]:
    """Each prompt's greedy reply, straight to the server (no proxy), one at a time."""
    _, srv = served

    async def main() -> dict[str, str]:
        async with Client(srv.ws_url(), **FAST) as client:
            return {p: await client.chat(msgs(p), **GREEDY).text() for p in PROMPTS}

    out = anyio.run(main)
    assert len(set(out.values())) > 1  # the prompts really lead to different text
    return out


def server_stream(srv, session: str, sid: int):
    return srv.app.state.sessions.sessions[session].streams.get(sid)


@pytest.mark.anyio
async def test_100_chats_through_random_drops_are_exact(served, undisturbed):
    _, srv = served
    plan = random_plan(seed=11, p_handshake=0.2, p_drop=0.8, down=(400, 6000))  # every socket dies
    results = []
    with FaultProxy(srv.port, plan=plan) as proxy:
        async with Client(proxy.url(), **FAST) as client:
            limit = anyio.Semaphore(20)

            async def one(i: int) -> None:
                async with limit:
                    prompt = PROMPTS[i % len(PROMPTS)]
                    r0 = client.reconnects
                    stream = client.chat(msgs(prompt), **GREEDY)
                    deltas = [d async for d in stream]
                    results.append((prompt, stream, deltas, client.reconnects - r0))

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(one, i)
            session = client.session
            assert client.sessions_lost == 0
        assert proxy.handshake_cuts >= 3 and proxy.cuts >= 20, (proxy.cuts, proxy.handshake_cuts)
    assert len(results) == 100
    for prompt, stream, deltas, _ in results:
        assert "".join(d.text for d in deltas) == undisturbed[prompt]
        assert stream.finish_reason == "length" and stream.usage.completion_tokens == 24
        # exactly once: seqs 1..K with nothing skipped or repeated, and K is the server's count
        assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
        assert stream.done_seq == len(deltas) + 1
        st = server_stream(srv, session, stream.id)
        if st is not None:  # finished streams are kept (up to finished_streams_kept)
            assert st.last_seq == stream.done_seq
    # several drops within one stream's life
    assert max(r for *_, r in results) >= 2


@pytest.mark.anyio
@pytest.mark.parametrize("batch", [True, False])
async def test_200_concurrent_chats_over_one_client(served, undisturbed, batch, monkeypatch):
    engine, srv = served
    out: dict[int, str] = {}
    sizes: list[int] = []
    parse = P.parse_server_frames

    def counting(raw):
        frames = parse(raw)
        sizes.append(len(frames))
        return frames

    monkeypatch.setattr(P, "parse_server_frames", counting)
    async with Client(srv.ws_url(), batch=batch, **FAST) as client:

        async def one(i: int) -> None:
            out[i] = await client.chat(msgs(PROMPTS[i % 5]), temperature=0, max_tokens=4).text()

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert client.reconnects == 0
    # max_tokens=4 (no ignore_eos): the reply is a prefix of the 24-token undisturbed one
    for i in range(200):
        assert out[i] and undisturbed[PROMPTS[i % 5]].startswith(out[i]), (i, out[i])
    # With batches the frames of one engine step shared messages; without, one frame each.
    assert (max(sizes) > 1) is batch


@pytest.mark.anyio
async def test_session_expiry_while_disconnected_raises_stream_lost(served):
    engine, srv = served
    with FaultProxy(srv.port) as proxy:
        # enough attempts to outlast the outage: the session, not the retry budget, runs out
        async with Client(proxy.url(), **{**FAST, "reconnect_attempts": 100}) as client:
            stream = client.chat(msgs("expire me"), temperature=0, max_tokens=200, ignore_eos=True)
            got: list[str] = []
            with pytest.raises(StreamLost, match="session expired") as ei:
                async for d in stream:
                    got.append(d.text)
                    if len(got) == 3:
                        proxy.refusing = True  # an outage longer than the resume TTL
                        proxy.drop_all()
                        await anyio.sleep(RESUME_TTL * 2)
                        proxy.refusing = False
            assert ei.value.text == "".join(got) and got
            assert client.sessions_lost == 1
            # the client goes on, on its new session
            reply = await client.chat(msgs("again"), temperature=0, max_tokens=3).text()
            assert reply
    # the expired stream's blocks came back
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total:
            break
        await anyio.sleep(0.05)
    s = engine.stats()
    assert s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total


# ---- the real gateway's refusals, on its fake engine (no model needed) ---------------------------


@pytest.fixture(scope="module")
def keyed():
    from tests.gateway_helpers import FakeEngine

    # the server pings often: an idle client must answer (pongs) or be dropped
    settings = GatewaySettings(
        api_keys=("k1",), max_connections=2, ws_ping_interval=0.05, ws_ping_timeout=0.2
    )
    with run_server(FakeEngine(step_s=0.002), settings) as srv:
        yield srv


@pytest.mark.anyio
async def test_gateway_refusals_map_to_errors(keyed):
    from asyncllm.client import AuthError, Overloaded, ServerError
    from tests.gateway_helpers import CharTokenizer, fake_text

    t0 = time.monotonic()
    for key in ("wrong", None):
        with pytest.raises(AuthError):
            async with Client(keyed.ws_url(), api_key=key, **FAST):
                pass
    assert time.monotonic() - t0 < 3  # refused keys are not retried
    async with Client(keyed.ws_url(), api_key="k1", **FAST) as client:
        reply = await client.complete("resume me", max_tokens=20).text()
        assert reply == fake_text(CharTokenizer().encode("resume me"), 0, 20)
        with pytest.raises(ServerError) as ei:
            await client.chat(msgs("hi"), model="gpt-9").text()
        assert ei.value.code == "not_found"
        with pytest.raises(ServerError) as ei:  # over the model's 512 tokens
            await client.complete("x" * 600).text()
        assert ei.value.code == "too_large"
        # the socket limit (2): a third client is told the server is overloaded
        async with Client(keyed.ws_url(), api_key="k1", **FAST):
            with pytest.raises(Overloaded):
                async with Client(
                    keyed.ws_url(), api_key="k1", reconnect_attempts=2, backoff_initial=0.01
                ):
                    pass
        # and the first client's socket is untouched by all of it
        assert client.reconnects == 0
        assert await client.complete("again", max_tokens=3).text()


@pytest.mark.anyio
async def test_idle_client_answers_server_pings(keyed):
    async with Client(keyed.ws_url(), api_key="k1", **FAST, ping_interval=0.1) as client:
        await anyio.sleep(1.0)  # 20 server pings, 10 of ours
        assert await client.complete("still here", max_tokens=3).text()
        assert client.reconnects == 0
