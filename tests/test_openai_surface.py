"""The rest of the OpenAI/vLLM HTTP surface on a tiny real model: logit_bias, echo, lists of
prompts, suffix without FIM tokens, return_token_ids, over-long requests, the n > 1 streamed
finish_reason, vLLM's extra fields, the utility routes, --max-tokens-default; response_format
and a named tool call on the tiny model (grammar-enforced, so it holds even for random weights)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import run_server

MAX_LEN = 512


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    from asyncllm import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_model_dir, max_model_len=MAX_LEN, num_kv_blocks=128)
    )
    with run_server(engine, GatewaySettings(max_tokens_default=5)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.http + "/v1", api_key="x", max_retries=0) as c:
        c.model_id = c.models.list().data[0].id
        yield c


def test_logit_bias_forces_a_token(client):
    r = client.completions.create(
        model=client.model_id, prompt="Hello", max_tokens=4, temperature=1.0,
        logit_bias={"42": 100},
    )  # fmt: skip
    assert r.choices[0].text  # generated; the ids say which
    r = client.completions.create(
        model=client.model_id, prompt="Hello", max_tokens=4, logit_bias={"42": 100},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].model_extra["token_ids"] == [42] * 4


def test_echo_and_lists_of_prompts(client):
    r = client.completions.create(
        model=client.model_id, prompt=["Hello world", "The sky"], max_tokens=3, n=2, echo=True,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text[:11] for c in r.choices[:2]] == ["Hello world"] * 2
    assert all(c.text.startswith("The sky") for c in r.choices[2:])
    assert r.choices[0].text == r.choices[1].text  # greedy: n copies agree
    assert r.usage.completion_tokens == 12
    stream = client.completions.create(
        model=client.model_id, prompt=["Hello world", "The sky"], max_tokens=3, echo=True,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == r.choices[0].text and texts[1] == r.choices[2].text


def test_suffix_needs_fim_tokens(client):
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle"):
        client.completions.create(model=client.model_id, prompt="def f(", suffix="):", max_tokens=2)


def test_over_long_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=client.model_id, prompt="Hello", max_tokens=MAX_LEN)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(
            model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2000
        )


def test_streamed_n_gives_each_finish_reason_once(client):
    stream = client.completions.create(
        model=client.model_id, prompt="Hello", max_tokens=12, n=4, temperature=1.0, seed=3,
        stream=True, stop=["e", "a", "o"],
    )  # fmt: skip
    finishes: dict[int, list[str]] = {}
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    assert sorted(finishes) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in finishes.values()), finishes


def test_return_token_ids_and_vllm_extras(client):
    r = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_body={"return_token_ids": True, "skip_special_tokens": False,
                    "chat_template_kwargs": {}, "include_stop_str_in_output": False,
                    "ignore_eos": True},
    )  # fmt: skip
    extra = r.model_extra
    assert isinstance(extra["prompt_token_ids"], list) and extra["prompt_token_ids"]
    assert len(r.choices[0].model_extra["token_ids"]) == 3
    stream = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        stream=True, extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    ids = [t for ch in stream for c in ch.choices for t in (c.model_extra.get("token_ids") or [])]
    assert len(ids) == 3
    with pytest.raises(openai.BadRequestError, match="spaces_between_special_tokens"):
        client.chat.completions.create(
            model=client.model_id, messages=[{"role": "user", "content": "hi"}],
            extra_body={"spaces_between_special_tokens": True},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="skip_special_tokens"):
        client.chat.completions.create(
            model=client.model_id, messages=[{"role": "user", "content": "hi"}],
            extra_body={"skip_special_tokens": "no"},
        )  # fmt: skip


def test_max_tokens_default(client):
    r = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_utility_routes(srv, client):
    h = httpx.Client(base_url=srv.http)
    assert h.get("/version").json()["version"]
    m = h.get(f"/v1/models/{client.model_id}").json()
    assert m["id"] == client.model_id and m["max_model_len"] == MAX_LEN
    assert h.get("/v1/models/other").status_code == 404
    t = h.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) > 0
    assert h.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    chat = h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > t["count"] - 2
    assert h.post("/detokenize", json={"tokens": [-1]}).status_code == 400
    assert h.post("/tokenize", json={}).status_code == 400


def test_response_format_and_named_tool_on_the_tiny_model(client):
    schema = {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "s": {"type": "string", "maxLength": 5}},
        "required": ["x", "s"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=60,
        temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    small = {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": small}}]
    stream = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=24,
        temperature=1.0, seed=2, tools=tools, stream=True,
        tool_choice={"type": "function", "function": {"name": "f"}},
    )  # fmt: skip
    args, name, finish = "", None, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert name == "f" and finish == "tool_calls"
    jsonschema.validate(json.loads(args), small)
