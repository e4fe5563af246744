"""Tool calls and constraint fields without a model: checking tools / tool_choice /
response_format / structured_outputs, the forced-choice schemas, the three parsers, and
ToolCallStream's deltas assembled the way the openai SDK does."""

from __future__ import annotations

import json

import jsonschema
import pytest

from asyncllm.protocol import ProtocolError, parse_messages, parse_params
from asyncllm.structured import ConstraintError, constraint_for, parse_constraint_fields
from asyncllm.tools import (
    ToolCallStream,
    get_parser,
    parse_tool_choice,
    parse_tools,
    parser_for_model,
    tool_constraint,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "noop"}},
]


def _assemble(deltas: list[dict]) -> list[dict]:
    """What the openai SDK does with streamed tool-call deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        c["id"] = d.get("id") or c["id"]
        fn = d.get("function", {})
        c["name"] += fn.get("name") or ""
        c["arguments"] += fn.get("arguments") or ""
    return [calls[k] for k in sorted(calls)]


def test_tools_and_tool_choice_are_checked():
    tools = parse_tools(TOOLS)
    assert tools[1]["parameters"] == {"type": "object", "properties": {}}
    assert parse_tool_choice(None, tools) == "auto"
    assert parse_tool_choice(None, None) is None
    assert parse_tool_choice({"type": "function", "function": {"name": "noop"}}, tools) == "noop"
    for bad_choice in ("always", {"function": {"name": "missing"}}, 3):
        with pytest.raises(ValueError):
            parse_tool_choice(bad_choice, tools)
    with pytest.raises(ValueError, match="needs tools"):
        parse_tool_choice("required", None)
    for bad in ([{"type": "function"}], [{"function": {"name": "a b"}}], TOOLS + TOOLS[:1]):
        with pytest.raises(ValueError):
            parse_tools(bad)


def test_forced_choice_schemas_accept_exactly_calls():
    tools = parse_tools(TOOLS)
    named = tool_constraint(tools, "get_weather")
    jsonschema.validate({"city": "Oslo"}, named)
    required = tool_constraint(tools, "required")
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "x"}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "other", "parameters": {}}], required)


def test_constraint_fields():
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER, "strict": True}}
    assert parse_constraint_fields({"response_format": rf}) == {
        "structured_outputs": {"json": WEATHER}
    }
    assert parse_constraint_fields({"response_format": {"type": "json_object"}}) == {
        "structured_outputs": {"json_object": True}
    }
    assert parse_constraint_fields({"response_format": {"type": "text"}}) == {}
    assert parse_constraint_fields({"guided_regex": "a+"}) == {
        "structured_outputs": {"regex": "a+"}
    }
    assert parse_constraint_fields({"structured_outputs": {"choice": ["a", "b"]}}) == {
        "structured_outputs": {"choice": ["a", "b"]}
    }
    assert parse_constraint_fields({"logit_bias": {"5": 3}}) == {"logit_bias": {5: 3.0}}
    for bad in (
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema"}},
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        {"structured_outputs": {"jsn": {}}},
        {"structured_outputs": {"choice": []}},
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"1": 200}},
    ):
        with pytest.raises(ConstraintError):
            parse_constraint_fields(bad)
    kw = parse_constraint_fields({"tools": TOOLS, "tool_choice": "required"})
    assert constraint_for(None, kw["tools"], kw["tool_choice"])["json"]["type"] == "array"
    assert constraint_for({"regex": "a"}, kw["tools"], "auto") == {"regex": "a"}


def test_params_carry_constraints_into_sampling_kwargs():
    gp = parse_params({"response_format": {"type": "json_object"}, "logit_bias": {"3": -100}})
    kw = gp.sampling_kwargs()
    assert kw["structured_outputs"] == {"json_object": True} and kw["logit_bias"] == {3: -100.0}
    with pytest.raises(ProtocolError, match="response_format"):
        parse_params({"response_format": "json"})


def test_messages_keep_tool_calls_and_tool_results():
    msgs = parse_messages(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"a": 1}},
                    }
                ],
            },  # fmt: skip
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assert msgs[1]["content"] == ""
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert msgs[2]["tool_call_id"] == "c1"
    with pytest.raises(ProtocolError, match="tool_calls"):
        parse_messages([{"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}])


@pytest.mark.parametrize(
    "name,text,content,calls",
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
         "Sure.", [("f", {"a": 1})]),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>'
         '{"name": "g", "arguments": {"b": "x"}}</tool_call>', "", [("f", {}), ("g", {"b": "x"})]),
        ("hermes", "no calls here", "no calls here", []),
        ("hermes", "<tool_call>{broken", "<tool_call>{broken", []),
        ("llama3_json", '{"name": "f", "parameters": {"a": 2}}', "", [("f", {"a": 2})]),
        ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", '
         '"parameters": {}}', "", [("f", {}), ("g", {})]),
        ("llama3_json", "Plain answer.", "Plain answer.", []),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 3}}]', "", [("f", {"a": 3})]),
        ("mistral", "Hello", "Hello", []),
    ],
)  # fmt: skip
def test_parsers(name, text, content, calls):
    got_content, got = get_parser(name).parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_auto_stream_in_small_pieces_equals_the_parse(name):
    text = {
        "hermes": 'Let me check. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>',
        "llama3_json": '  {"name": "f", "parameters": {"a": 1}}',
        "mistral": 'Let me check. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]',
    }[name]
    ts = ToolCallStream("auto", get_parser(name))
    content, deltas = [], []
    for k in range(0, len(text), 3):
        d = ts.feed(text[k : k + 3])
        content.append(d.content)
        deltas += d.tool_calls
    end = ts.finish()
    content.append(end.content)
    deltas += end.tool_calls
    assert "TOOL" not in "".join(content) and "tool_call" not in "".join(content)
    (call,) = _assemble(deltas)
    assert call["name"] == "f" and json.loads(call["arguments"]) == {"a": 1}
    assert call["id"].startswith("call_") and ts.finish_reason("stop") == "tool_calls"


def test_auto_stream_passes_plain_text_and_a_lone_angle_bracket():
    ts = ToolCallStream("auto", get_parser("hermes"))
    out = [ts.feed(p).content for p in ["a < b", " and <", "tool"]]
    out.append(ts.finish().content)
    assert "".join(out) == "a < b and <tool" and not ts.calls
    assert ts.finish_reason("stop") == "stop"


def test_named_and_required_streams():
    ts = ToolCallStream("get_weather", None)
    deltas = ts.feed('{"city"').tool_calls + ts.feed(': "Oslo"}').tool_calls
    deltas += ts.finish().tool_calls
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    (call,) = _assemble(deltas)
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    ts = ToolCallStream("required", None)
    body = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    assert ts.feed(body[:10]).tool_calls == [] and ts.feed(body[10:]).content == ""
    calls = _assemble(ts.finish().tool_calls)
    assert [c["name"] for c in calls] == ["f", "g"] and len({c["id"] for c in calls}) == 2


def test_parser_for_model():
    class Tok:
        chat_template = "{{ messages }}"

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert parser_for_model(Tok({"[TOOL_CALLS]": 5})) == "mistral"
    t = Tok({})
    t.chat_template = "{% if ipython %}<|python_tag|>{% endif %}"
    assert parser_for_model(t) == "llama3_json"
    assert parser_for_model(Tok({})) == "hermes"


def test_ws_frames_take_constraints_and_refuse_tools_on_complete():
    from asyncllm.protocol import parse_client_frame

    tools = [{"type": "function", "function": {"name": "f"}}]
    f = parse_client_frame(
        json.dumps(
            {
                "type": "chat",
                "id": 1,
                "messages": [{"role": "user", "content": "x"}],
                "params": {"tools": tools, "tool_choice": "required"},
            }
        )
    )
    assert f.params.tool_choice == "required"
    assert f.params.sampling_kwargs()["structured_outputs"]["json"]["minItems"] == 1
    with pytest.raises(ProtocolError, match="chat frames"):
        parse_client_frame(
            json.dumps({"type": "complete", "id": 2, "prompt": "x", "params": {"tools": tools}})
        )
    with pytest.raises(ProtocolError, match="structured_outputs"):
        parse_client_frame(
            json.dumps(
                {"type": "complete", "id": 3, "prompt": "x",
                 "params": {"structured_outputs": {"regex": ""}}}
            )
        )  # fmt: skip
