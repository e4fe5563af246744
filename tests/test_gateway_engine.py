"""The gateway on the real AsyncLLMEngine (tiny random model, CPU), against a real uvicorn:
what comes over the socket / HTTP equals LLM.generate (greedy), and KV blocks come back."""

from __future__ import annotations

import socket
import time

import openai
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import WS, run_server

ENGINE_ARGS = dict(num_kv_blocks=96, block_size=16, max_model_len=256, seed=0)
PROMPTS = [f"Hello world {i}: the sky is" for i in range(10)]


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from asyncllm import LLM

    return LLM(model=tiny_model_dir, **ENGINE_ARGS)


def reference(llm, prompts, **kw) -> list[str]:
    from asyncllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, **kw), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module", params=[False, True], ids=["engine_thread", "engine_process"])
def served(tiny_model_dir, request):
    """The app on the engine in a thread of this process, and in a child process of its own."""
    from asyncllm import AsyncLLMEngine, EngineArgs

    args = EngineArgs(model=tiny_model_dir, engine_process=request.param, **ENGINE_ARGS)
    engine = AsyncLLMEngine.from_engine_args(args)
    with run_server(engine, GatewaySettings(resume_ttl=0.5)) as srv:
        yield engine, srv


def idle(engine) -> bool:
    s = engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total


def test_two_sockets_five_streams_each_one_cancelled(served, llm):
    engine, srv = served
    want = reference(llm, PROMPTS, max_tokens=16)
    sockets = [WS(srv.ws_url()), WS(srv.ws_url())]
    for i, p in enumerate(PROMPTS):
        ws = sockets[i % 2]
        params = {"max_tokens": 16, "temperature": 0}
        if i == 3:
            params = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
        ws.send({"type": "complete", "id": f"s{i}", "prompt": p, "params": params})
    sockets[1].until(lambda f: f["type"] == "delta" and f["id"] == "s3")
    sockets[1].send({"type": "cancel", "id": "s3"})
    for k, ws in enumerate(sockets):
        ws.until_done([f"s{i}" for i in range(k, 10, 2)], timeout=60)
    for i in range(10):
        ws = sockets[i % 2]
        frames = ws.of(f"s{i}")
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        if i == 3:
            done = ws.done("s3")
            assert done["finish_reason"] == "cancelled"
            assert done["usage"]["completion_tokens"] < 200
        else:
            assert ws.text(f"s{i}") == want[i], i
    # The cancelled stream's blocks (and everyone else's) are free again.
    assert wait_for(lambda: idle(engine)), engine.stats()
    for ws in sockets:
        ws.close()


def test_resume_on_the_real_engine(served, llm):
    engine, srv = served
    params = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}
    (want,) = reference(llm, [PROMPTS[0]], max_tokens=120, ignore_eos=True)
    ws = WS(srv.ws_url())
    key = ws.session["session"]
    ws.send({"type": "complete", "id": "r", "prompt": PROMPTS[0], "params": params})
    for _ in range(3):
        ws.until(lambda f: f["type"] == "delta")
    ws.conn.socket.shutdown(socket.SHUT_RDWR)
    ws.conn.socket.close()
    ws2 = WS(srv.ws_url(f"session={key}"))
    assert ws2.session["session"] == key
    after = ws.of("r")[-1]["seq"]
    ws2.send({"type": "resume", "id": "r", "after": after})
    ws2.until_done(["r"], timeout=60)
    got = ws.of("r") + ws2.of("r")
    assert [f["seq"] for f in got] == list(range(1, len(got) + 1))
    assert "".join(f["text"] for f in got if f["type"] == "delta") == want
    assert got[-1]["usage"]["completion_tokens"] == 120
    ws2.close()
    assert wait_for(lambda: idle(engine)), engine.stats()


def test_ttl_frees_blocks(tiny_model_dir):
    from asyncllm import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=tiny_model_dir, **ENGINE_ARGS))
    with run_server(engine, GatewaySettings(resume_ttl=0.05)) as srv:
        ws = WS(srv.ws_url())
        params = {"max_tokens": 220, "ignore_eos": True}
        ws.send({"type": "complete", "id": "t", "prompt": PROMPTS[1], "params": params})
        ws.until(lambda f: f["type"] == "delta")
        ws.close()
        assert wait_for(lambda: idle(engine), 10), engine.stats()
        # It was cancelled by the TTL, not finished: fewer tokens than asked for.
        assert engine.stats().generation_tokens_total < 220
        metrics = srv.app.state.metrics
        assert metrics.requests.labels("ws", "cancelled")._value.get() == 1


def test_openai_client_matches_llm(served, llm):
    from asyncllm import SamplingParams

    engine, srv = served
    name = engine.model_config.served_model_name
    with openai.OpenAI(base_url=srv.http + "/v1", api_key="none", max_retries=0) as c:
        (want,) = reference(llm, [PROMPTS[2]], max_tokens=12)
        r = c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        s = c.completions.create(
            model=name, prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].text for ch in s) == want

        msgs = [{"role": "user", "content": "Hello, who are you?"}]
        (ref,) = llm.chat(
            msgs, SamplingParams(temperature=0, max_tokens=10, logprobs=2), use_tqdm=False
        )
        r = c.chat.completions.create(
            model=name, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
        )
        ch = r.choices[0]
        assert ch.message.content == ref.outputs[0].text
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        got_lps = [t.logprob for t in ch.logprobs.content]
        ref_lps = [
            d[tid].logprob
            for tid, d in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs, strict=True)
        ]
        assert got_lps == pytest.approx(ref_lps, abs=1e-4)
        assert all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)
        s = c.chat.completions.create(
            model=name, messages=msgs, max_tokens=10, temperature=0, stream=True
        )
        assert (
            "".join(x.choices[0].delta.content or "" for x in s if x.choices) == ref.outputs[0].text
        )
    assert wait_for(lambda: idle(engine)), engine.stats()


def test_ws_logprobs_token_ids_and_stop(served, llm):
    from asyncllm import SamplingParams

    engine, srv = served
    msgs = [{"role": "user", "content": "The capital of France"}]
    (ref,) = llm.chat(
        msgs, SamplingParams(temperature=0, max_tokens=12, logprobs=2), use_tqdm=False
    )
    ws = WS(srv.ws_url())
    params = {"max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    ws.send(
        {
            "type": "chat",
            "id": "lp",
            "messages": msgs,
            "params": {**params, "return_token_ids": True},
        }
    )
    ws.until_done(["lp"])
    deltas = ws.of("lp", "delta")
    ids = [t for f in deltas for t in f["token_ids"]]
    lps = [e for f in deltas for e in f["logprobs"]]
    out = ref.outputs[0]
    assert ws.text("lp") == out.text and ids == out.token_ids
    assert [e["id"] for e in lps] == out.token_ids
    want = [d[t].logprob for t, d in zip(out.token_ids, out.logprobs, strict=True)]
    assert [e["logprob"] for e in lps] == pytest.approx(want, abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in lps)
    # A stop string taken from the reference text ends the stream there, without the stop text.
    text = out.text
    if len(text) >= 4:
        stop = text[2:4]
        (sref,) = llm.chat(
            msgs, SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False
        )
        ws.send(
            {
                "type": "chat",
                "id": "st",
                "messages": msgs,
                "params": {"max_tokens": 12, "temperature": 0, "stop": stop},
            }
        )
        ws.until_done(["st"])
        assert ws.text("st") == sref.outputs[0].text and stop not in ws.text("st")
        assert ws.done("st")["finish_reason"] == "stop"
    ws.close()


def test_openai_stop_seed_and_legacy_logprobs_match_llm(served, llm):
    """The HTTP side's sampling fields reach the engine as LLM's SamplingParams would."""
    from asyncllm import SamplingParams

    engine, srv = served
    name = engine.model_config.served_model_name
    prompt = PROMPTS[4]
    with openai.OpenAI(base_url=srv.http + "/v1", api_key="none", max_retries=0) as c:
        # stop: the text ends before the stop string, finish_reason "stop"
        (full,) = reference(llm, [prompt], max_tokens=16, ignore_eos=True)
        assert len(full) >= 6
        stop = full[3:6]
        (want,) = reference(llm, [prompt], max_tokens=16, stop=[stop])
        for stream in (False, True):
            r = c.completions.create(
                model=name, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], stream=stream
            )
            chunks = list(r) if stream else [r]
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
            assert text == want and stop not in text and finish == ["stop"]
        # seed: sampled text equals LLM's with the same seed (seeds do not depend on the batch)
        msgs = [{"role": "user", "content": "Tell me something"}]
        sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, n=2)
        (ref,) = llm.chat(msgs, sp, use_tqdm=False)
        r = c.chat.completions.create(
            model=name, messages=msgs, temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, n=2
        )
        assert [ch.message.content for ch in r.choices] == [o.text for o in ref.outputs]
        # the legacy API's integer logprobs
        (lref,) = llm.generate(
            prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=2), use_tqdm=False
        )
        r = c.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
        lp = r.choices[0].logprobs
        out = lref.outputs[0]
        want_lps = [d[t].logprob for t, d in zip(out.token_ids, out.logprobs, strict=True)]
        assert lp.token_logprobs == pytest.approx(want_lps, abs=1e-4)
        assert len(lp.tokens) == len(lp.top_logprobs) == len(out.token_ids)
    assert wait_for(lambda: idle(engine)), engine.stats()


def test_constrained_output_on_both_transports(served):
    """A constraint crosses to the engine (thread or child process) with its SamplingParams; a
    bad one is a 400 on either."""
    import json

    engine, srv = served
    name = engine.model_config.served_model_name
    with openai.OpenAI(base_url=srv.http + "/v1", api_key="none", max_retries=0) as c:
        r = c.completions.create(
            model=name, prompt=PROMPTS[0], max_tokens=30, temperature=1.0, seed=1,
            extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
        )  # fmt: skip
        assert r.choices[0].text in ("alpha", "beta") and r.choices[0].finish_reason == "stop"
        r = c.completions.create(
            model=name, prompt=PROMPTS[0], max_tokens=40, temperature=1.0, seed=2,
            extra_body={"structured_outputs": {"json": {"type": "object", "properties": {
                "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
                "additionalProperties": False}}},
        )  # fmt: skip
        assert 0 <= json.loads(r.choices[0].text)["n"] <= 9
        with pytest.raises(openai.BadRequestError, match="invalid structured_outputs"):
            c.completions.create(
                model=name, prompt=PROMPTS[0], max_tokens=4,
                extra_body={"structured_outputs": {"grammar": "root ::= ("}},
            )  # fmt: skip
    assert idle(engine)
