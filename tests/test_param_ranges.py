"""Sampling-parameter ranges are written once (sampling_params.PARAM_RANGES): a value out of range
gets the same message from SamplingParams, the WebSocket params parser and the OpenAI HTTP API."""

from __future__ import annotations

import httpx
import pytest

from asyncllm import protocol as P
from asyncllm.sampling_params import SamplingParams
from tests.gateway_helpers import WS, FakeEngine, run_server

BAD = [
    ("top_p", 0),
    ("top_p", 1.5),
    ("temperature", -0.5),
    ("min_p", 2),
    ("presence_penalty", -3),
    ("frequency_penalty", 2.5),
    ("repetition_penalty", 0),
    ("top_k", -2),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("n", 0),
    ("seed", 1.5),
    ("temperature", "hot"),
    ("max_tokens", True),
]


def _sampling_params_message(name, value) -> str:
    with pytest.raises(ValueError) as ei:
        SamplingParams(**{name: value})
    return str(ei.value)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_the_parser_refuses_what_sampling_params_refuses_with_its_message(name, value):
    msg = _sampling_params_message(name, value)
    assert msg.startswith(f"{name} must be ") and repr(value) in msg
    with pytest.raises(P.ProtocolError) as ei:
        P.parse_params({name: value}, "s")
    assert ei.value.code == P.INVALID_REQUEST and ei.value.message == msg


def test_edges_accepted_by_both():
    ok = dict(top_p=1, temperature=0, min_p=0, top_k=-1, presence_penalty=-2, seed=-7)
    SamplingParams(**ok)
    gp = P.parse_params(ok)
    SamplingParams(**gp.sampling_kwargs())


@pytest.fixture(scope="module")
def server():
    with run_server(FakeEngine(step_s=0.001)) as srv:
        yield srv


@pytest.mark.parametrize(("name", "value"), [("top_p", 0), ("temperature", -1), ("n", 0)])
def test_same_message_over_websocket_and_http(server, name, value):
    msg = _sampling_params_message(name, value)
    ws = WS(server.ws_url())
    ws.send({"type": "complete", "id": "x", "prompt": "hi", "params": {name: value}})
    err = ws.until(lambda f: f["type"] == "error")
    ws.close()
    assert err["code"] == "invalid_request" and err["message"] == msg
    r = httpx.post(
        server.http + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], name: value},
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == msg
