"""What bots need, end to end on the default model (SmolLM2-135M) at temperature 1.0, where an
unconstrained 135M model breaks the format: every json_schema answer validates and every forced
tool call's arguments validate against the function's parameters, streamed and not, over HTTP
(the official `openai` client), the WebSocket protocol and `asyncllm.client`. Few requests,
small max_tokens: the model runs on the CI's two cores."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import WS, run_server
from tests.test_loader import needs_default_model

pytestmark = [needs_default_model, pytest.mark.slow]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def srv():
    from asyncllm import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(max_model_len=1024))
    with run_server(engine, GatewaySettings(), start_timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.http + "/v1", api_key="x", max_retries=0) as c:
        c.model_id = c.models.list().data[0].id
        yield c


def _check_weather_call(call: dict) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


def test_http_json_schema_streamed_and_not(client):
    r = client.chat.completions.create(
        model=client.model_id, messages=ASK_PERSON, temperature=1.0, max_tokens=48,
        response_format=RESPONSE_FORMAT,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    stream = client.chat.completions.create(
        model=client.model_id, messages=ASK_PERSON, temperature=1.0, max_tokens=48, stream=True,
        extra_body={"structured_outputs": {"json": PERSON}},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_http_forced_tool_calls_streamed_and_not(client):
    r = client.chat.completions.create(
        model=client.model_id, messages=ASK_WEATHER, temperature=1.0, max_tokens=40,
        tools=TOOLS, tool_choice=NAMED,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_weather_call(call.model_dump())

    # `required`, streamed: the SDK's own assembler (stream helper) puts the call together. The
    # grammar forces a call but not a short one: at temperature 1.0 a free-text argument ran past
    # 60 tokens in one CI-sized run (finish_reason length), so it gets room to close.
    with client.chat.completions.stream(
        model=client.model_id, messages=ASK_WEATHER, temperature=1.0, max_tokens=160,
        tools=TOOLS, tool_choice="required",
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        c = call.model_dump()
        if c["function"]["name"] == "get_weather":
            _check_weather_call(c)
        else:
            assert c["function"]["name"] == "get_time"
            assert json.loads(c["function"]["arguments"]) == {}


def test_http_tool_result_in_history(client):
    history = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(
        model=client.model_id, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_websocket_json_schema_and_named_tool_call(srv):
    ws = WS(srv.ws_url())
    try:
        ws.send({"type": "chat", "id": 1, "messages": ASK_PERSON,
                 "params": {"temperature": 1.0, "max_tokens": 48,
                            "response_format": RESPONSE_FORMAT}})  # fmt: skip
        ws.send({"type": "chat", "id": 2, "messages": ASK_WEATHER,
                 "params": {"temperature": 1.0, "max_tokens": 40,
                            "tools": TOOLS, "tool_choice": NAMED}})  # fmt: skip
        ws.until_done([1, 2], timeout=120)
        jsonschema.validate(json.loads(ws.text(1)), PERSON)
        assert ws.done(1)["finish_reason"] == "stop"
        pieces = [p for f in ws.of(2, "delta") for p in f.get("tool_calls", [])]
        assert pieces[0]["id"] and pieces[0]["function"]["name"] == "get_weather"
        args = "".join(p["function"].get("arguments", "") for p in pieces)
        call = {"id": pieces[0]["id"], "type": "function",
                "function": {"name": "get_weather", "arguments": args}}  # fmt: skip
        _check_weather_call(call)
        assert ws.text(2) == "" and ws.done(2)["finish_reason"] == "tool_calls"
    finally:
        ws.close()


def test_asyncllm_client_json_and_required_tool_call(srv):
    from asyncllm.client import SyncClient

    with SyncClient(srv.ws_url()) as c:
        s = c.chat(ASK_PERSON, temperature=1.0, max_tokens=48, response_format=RESPONSE_FORMAT)
        jsonschema.validate(json.loads(s.text()), PERSON)
        s = c.chat(ASK_WEATHER, temperature=1.0, max_tokens=60, tools=TOOLS, tool_choice="required")
        deltas = list(s)
        assert any(d.tool_calls for d in deltas)
        calls = s.tool_calls()
        assert calls and s.finish_reason == "tool_calls"
        for call in calls:
            if call["function"]["name"] == "get_weather":
                _check_weather_call(call)
            else:
                assert json.loads(call["function"]["arguments"]) == {}


def test_bad_schema_is_a_400_before_the_stream(client):
    with pytest.raises(openai.BadRequestError, match="invalid structured_outputs"):
        client.chat.completions.create(
            model=client.model_id, messages=ASK_PERSON, max_tokens=4, stream=True,
            extra_body={"structured_outputs": {"json": {"type": "nonsense"}}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=client.model_id, messages=ASK_PERSON, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "nope"}}, tools=TOOLS,
        )  # fmt: skip
