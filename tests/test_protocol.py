"""The wire protocol's frame parser: every bad input gets its code, nothing else ever raises."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm import protocol as P
from asyncllm.protocol import ProtocolError, parse_client_frame


def dumps(obj) -> str:
    return orjson.dumps(obj).decode()


MSG = [{"role": "user", "content": "hi"}]


def test_parses_each_frame_type():
    f = parse_client_frame(
        dumps(
            {
                "type": "chat",
                "id": "a",
                "messages": MSG,
                "params": {"max_tokens": 5, "temperature": 0, "stop": "x", "n": 2, "priority": -1},
            }
        )
    )
    assert isinstance(f, P.ChatFrame) and f.id == "a" and f.messages == MSG
    assert f.params.max_tokens == 5 and f.params.stop == ["x"] and f.params.n == 2
    assert f.params.priority == -1
    kw = f.params.sampling_kwargs()
    assert kw == {"n": 2, "max_tokens": 5, "temperature": 0.0, "stop": ["x"]}

    c = parse_client_frame(dumps({"type": "complete", "id": 7, "prompt": [1, 2, 3]}))
    assert isinstance(c, P.CompleteFrame) and c.id == 7 and c.prompt == [1, 2, 3]
    assert parse_client_frame(b'{"type":"cancel","id":"a"}') == P.CancelFrame("a")
    assert parse_client_frame('{"type":"resume","id":"a","after":3}') == P.ResumeFrame("a", 3)


def test_logprobs_map_to_sampling_params():
    f = parse_client_frame(
        dumps({"type": "chat", "id": 1, "messages": MSG, "params": {"logprobs": True}})
    )
    assert f.params.sampling_kwargs()["logprobs"] == 0
    f = parse_client_frame(
        dumps(
            {
                "type": "chat",
                "id": 1,
                "messages": MSG,
                "params": {"logprobs": True, "top_logprobs": 3},
            }
        )
    )
    assert f.params.sampling_kwargs()["logprobs"] == 3


def test_content_parts_are_joined():
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    f = parse_client_frame(dumps({"type": "chat", "id": 1, "messages": msgs}))
    assert f.messages == [{"role": "user", "content": "ab"}]


BAD = [
    # (frame, code, id the error names)
    ("not json", P.INVALID_REQUEST, None),
    ("[1,2]", P.INVALID_REQUEST, None),
    ("", P.INVALID_REQUEST, None),
    (b"\xff\xfe", P.INVALID_REQUEST, None),
    ({"type": "nope", "id": "a"}, P.INVALID_REQUEST, "a"),
    ({"id": "a"}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "messages": MSG}, P.INVALID_REQUEST, None),
    ({"type": "chat", "id": "", "messages": MSG}, P.INVALID_REQUEST, None),
    ({"type": "chat", "id": True, "messages": MSG}, P.INVALID_REQUEST, None),
    ({"type": "chat", "id": 1.5, "messages": MSG}, P.INVALID_REQUEST, None),
    ({"type": "chat", "id": "x" * 300, "messages": MSG}, P.INVALID_REQUEST, None),
    ({"type": "chat", "id": "a"}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": []}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": "hi"}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": [{"role": "user"}]}, P.INVALID_REQUEST, "a"),
    (
        {"type": "chat", "id": "a", "messages": [{"role": 1, "content": "x"}]},
        P.INVALID_REQUEST,
        "a",
    ),
    ({"type": "chat", "id": "a", "messages": MSG, "params": []}, P.INVALID_REQUEST, "a"),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"max_tokens": -1}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"max_tokens": 0}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"max_tokens": "5"}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"max_tokens": 5.0}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"max_tokens": True}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"temperature": -1}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"temperature": "hot"}},
        P.INVALID_REQUEST,
        "a",
    ),
    ({"type": "chat", "id": "a", "messages": MSG, "params": {"top_p": 2}}, P.INVALID_REQUEST, "a"),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"stop": [""]}},
        P.INVALID_REQUEST,
        "a",
    ),
    ({"type": "chat", "id": "a", "messages": MSG, "params": {"stop": 3}}, P.INVALID_REQUEST, "a"),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"logprobs": 1}},
        P.INVALID_REQUEST,
        "a",
    ),
    (
        {"type": "chat", "id": "a", "messages": MSG, "params": {"top_logprobs": 50}},
        P.INVALID_REQUEST,
        "a",
    ),
    ({"type": "chat", "id": "a", "messages": MSG, "params": {"n": 0}}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": MSG, "params": {"n": 10_000}}, P.TOO_LARGE, "a"),
    ({"type": "chat", "id": "a", "messages": MSG, "params": {"bogus": 1}}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": MSG, "extra": 1}, P.INVALID_REQUEST, "a"),
    ({"type": "chat", "id": "a", "messages": MSG, "model": 5}, P.INVALID_REQUEST, "a"),
    ({"type": "complete", "id": "a", "prompt": ""}, P.INVALID_REQUEST, "a"),
    ({"type": "complete", "id": "a", "prompt": [1, -2]}, P.INVALID_REQUEST, "a"),
    ({"type": "complete", "id": "a", "prompt": {"x": 1}}, P.INVALID_REQUEST, "a"),
    ({"type": "complete", "id": "a"}, P.INVALID_REQUEST, "a"),
    ({"type": "resume", "id": "a"}, P.INVALID_REQUEST, "a"),
    ({"type": "resume", "id": "a", "after": -1}, P.INVALID_REQUEST, "a"),
    ({"type": "resume", "id": "a", "after": "3"}, P.INVALID_REQUEST, "a"),
    ({"type": "cancel"}, P.INVALID_REQUEST, None),
    (
        '{"type":"chat","id":"a","messages":[{"role":"user","content":"x"}],"params":{"temperature":NaN}}',
        P.INVALID_REQUEST,
        None,
    ),
]


@pytest.mark.parametrize(("frame", "code", "id"), BAD)
def test_bad_frames_get_their_code(frame, code, id):
    data = frame if isinstance(frame, (str, bytes)) else dumps(frame)
    with pytest.raises(ProtocolError) as ei:
        parse_client_frame(data)
    assert ei.value.code == code, ei.value.message
    assert ei.value.id == id
    f = ei.value.frame()
    assert f["type"] == "error" and f["code"] == code and f["id"] == id and f["message"]


def test_frame_type_is_reported_for_rejected_starts():
    with pytest.raises(ProtocolError) as ei:
        parse_client_frame(dumps({"type": "complete", "id": 3, "prompt": ""}))
    assert ei.value.type == "complete"
    with pytest.raises(ProtocolError) as ei:
        parse_client_frame("nope")
    assert ei.value.type is None


def test_size_limit_is_too_large():
    big = dumps({"type": "complete", "id": "a", "prompt": "x" * 2000})
    with pytest.raises(ProtocolError) as ei:
        parse_client_frame(big, max_bytes=1000)
    assert ei.value.code == P.TOO_LARGE
    assert isinstance(parse_client_frame(big, max_bytes=10_000), P.CompleteFrame)


def test_server_frames_round_trip():
    for f in (
        P.session_frame("k", 30.0),
        P.delta_frame("a", 1, "hi", 0, [1, 2], None),
        P.done_frame("a", 2, "stop", 3, 4),
        P.error_frame(None, P.INTERNAL, "boom"),
    ):
        assert P.parse_server_frame(P.encode(f)) == f
    with pytest.raises(ValueError):
        P.parse_server_frame('{"type":"delta","id":"a"}')
    with pytest.raises(ValueError):
        P.parse_server_frame("[]")
    with pytest.raises(ValueError):
        P.parse_server_frame("nope")


def test_batch_messages_pack_in_order_within_the_limit():
    frames = [P.encode(P.delta_frame(f"s{i}", 1, "x" * i, 0)) for i in range(40)]
    one = P.batch_messages(frames[:1])
    assert one == [frames[0]]  # a lone frame goes as it is, never as a batch of one
    assert P.batch_messages([]) == []
    limit = 300
    msgs = P.batch_messages(frames, limit)
    assert len(msgs) > 1
    got = [f for m in msgs for f in P.parse_server_frames(m)]
    assert got == [orjson.loads(f) for f in frames]  # nothing lost, reordered or re-encoded
    for m in msgs:
        inner = P.parse_server_frames(m)
        # over the limit only when one frame alone is bigger
        assert len(m) <= limit + len('{"type":"batch","frames":[]}') or len(inner) == 1
    big = P.encode(P.delta_frame("big", 1, "y" * 1000, 0))
    assert P.batch_messages([frames[0], big, frames[1]], limit) == [frames[0], big, frames[1]]
    assert P.session_frame("k", 3.0, batch=True)["batch"] is True
    assert "batch" not in P.session_frame("k", 3.0)


def test_parse_server_frames_checks_every_frame_of_a_batch():
    d = P.encode(P.delta_frame("a", 1, "hi", 0))
    assert P.parse_server_frames(d) == [orjson.loads(d)]
    with pytest.raises(ValueError):
        P.parse_server_frames('{"type":"batch"}')
    with pytest.raises(ValueError):
        P.parse_server_frames('{"type":"batch","frames":[' + d + ',{"type":"delta"}]}')
    with pytest.raises(ValueError):
        P.parse_server_frames('{"type":"batch","frames":[' + d + ",[]]}")
    with pytest.raises(ValueError):
        P.parse_server_frame(P.batch_messages([d, d])[0])  # a batch is not one frame


def test_protocol_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, asyncllm.protocol; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- fuzzing ---------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(["type", "id", "messages", "prompt", "params", "after", "model", "x"])
param_names = st.sampled_from(sorted(P.PARAM_FIELDS) + ["bogus"])
frames = st.fixed_dictionaries(
    {"type": st.sampled_from([*P.CLIENT_TYPES, "nope"]) | json_values},
    optional={
        "id": st.text(max_size=5) | st.integers() | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "prompt": json_values,
        "params": st.dictionaries(param_names, json_values, max_size=5) | json_values,
        "after": st.integers() | json_values,
    },
) | st.dictionaries(field_names, json_values, max_size=6)


def _encodable(obj) -> str | None:
    try:  # json, not orjson: it also writes integers past 64 bits and NaN
        return json.dumps(obj)
    except (TypeError, ValueError):
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_fuzz_structured_frames(obj):
    data = _encodable(obj)
    if data is None:
        return
    try:
        f = parse_client_frame(data, max_bytes=1 << 16)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES
        assert e.id is None or P.valid_id(e.id)
        return
    assert isinstance(f, (P.ChatFrame, P.CompleteFrame, P.CancelFrame, P.ResumeFrame))
    assert P.valid_id(f.id)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_raw_bytes(data):
    try:
        parse_client_frame(data, max_bytes=100)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES
