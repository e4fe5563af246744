"""OpenAI-compatible HTTP against a real uvicorn with the fake engine: the official `openai`
client (streaming and not, both endpoints), error bodies and statuses, disconnects abort."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import CharTokenizer, FakeEngine, fake_text, run_server

MSG = [{"role": "user", "content": "hello"}]


def chat_ids(messages) -> list[int]:
    tok = CharTokenizer()
    return tok.encode(tok.apply_chat_template(messages))


@pytest.fixture(scope="module")
def srv():
    engine = FakeEngine(step_s=0.002)
    with run_server(engine, GatewaySettings(api_keys=("sk-test",), max_frame_bytes=8192)) as s:
        yield engine, s


@pytest.fixture
def client(srv):
    _, s = srv
    with openai.OpenAI(base_url=s.http + "/v1", api_key="sk-test", max_retries=0) as c:
        yield c


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]


def test_chat_non_streaming_n(client):
    r = client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=7, n=2)
    ids = chat_ids(MSG)
    assert [c.message.content for c in r.choices] == [fake_text(ids, k, 7) for k in range(2)]
    assert all(c.finish_reason == "length" and c.message.role == "assistant" for c in r.choices)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 14
    assert r.usage.total_tokens == len(ids) + 14 and r.model == "fake-model"


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="fake-model",
        messages=MSG,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            roles.append(c.delta.role)
            finish = c.finish_reason or finish
    assert text == fake_text(chat_ids(MSG), 0, 9)
    assert finish == "length" and roles[0] == "assistant"
    assert usage.completion_tokens == 9 and usage.prompt_tokens == len(chat_ids(MSG))


def test_completions_both_ways(client):
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=5)
    assert r.choices[0].text == fake_text(CharTokenizer().encode("abc"), 0, 5)
    assert r.usage.completion_tokens == 5
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="fake-model", prompt="abc", max_tokens=5, stream=True
        )
    )
    assert text == r.choices[0].text
    # The legacy default is 16 tokens.
    r = client.completions.create(model="fake-model", prompt=["abc"])
    assert r.usage.completion_tokens == 16


def test_errors(srv, client):
    _, s = srv
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="nope", messages=MSG)
    assert ei.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", messages=MSG, temperature="hot")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-model", prompt=["a", ""])  # one prompt is empty
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.http + "/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": "Bearer sk-test"}
    # raw HTTP: not JSON, not an object, too large, unknown route, wrong method
    for body, status in ((b"{nope", 400), (b"[1]", 400), (b"x" * 9000, 413)):
        r = httpx.post(s.http + "/v1/chat/completions", content=body, headers=h)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "code"}
    r = httpx.get(s.http + "/v1/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(s.http + "/v1/chat/completions", headers=h).status_code == 405
    r = httpx.post(
        s.http + "/v1/chat/completions", json={"messages": MSG, "tools": [{}]}, headers=h
    )
    assert r.status_code == 400
    # still serving
    assert client.completions.create(model="fake-model", prompt="x", max_tokens=1).choices


def test_disconnect_aborts(srv):
    engine, s = srv
    h = {"Authorization": "Bearer sk-test"}
    body = {"prompt": "slow", "max_tokens": 500}  # within the fake model's 512
    # streaming: read one event, then hang up
    with httpx.stream(
        "POST", s.http + "/v1/completions", json={**body, "stream": True}, headers=h
    ) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        next(lines)
        assert engine.active
    t = time.monotonic()
    while engine.active and time.monotonic() - t < 3:
        time.sleep(0.01)
    assert not engine.active
    # non-streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.http + "/v1/completions", json=body, headers=h, timeout=0.3)
    t = time.monotonic()
    while engine.active and time.monotonic() - t < 3:
        time.sleep(0.01)
    assert not engine.active


def test_every_route_but_health_and_the_page_needs_the_key(srv):
    _, s = srv
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, s.http + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
        r = httpx.request(
            method, s.http + path, json=body, headers={"Authorization": "Bearer sk-test"}
        )
        assert r.status_code == 200, (method, path, r.text)
    assert httpx.get(s.http + "/health").status_code == 200
    assert httpx.get(s.http + "/").status_code == 200  # the chat page holds no data
