"""Test helpers for the gateway: a real uvicorn on 127.0.0.1 in a background thread, a socket
client that records frames, and a small fake engine implementing EngineClient, the contract the
gateway is written against (for the session/limit logic, independent of the model)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import uvicorn
from websockets.sync.client import ClientConnection, connect

from asyncllm.engine.engine_client import EngineClient
from asyncllm.gateway import GatewayServer, GatewaySettings, build_app, uvicorn_config
from asyncllm.outputs import CompletionOutput, RequestOutput
from asyncllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class Server:
    host: str
    port: int
    app: Any
    server: uvicorn.Server

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, query: str = "") -> str:
        return f"ws://{self.host}:{self.port}/v1/ws" + (f"?{query}" if query else "")


@contextmanager
def run_server(
    engine: EngineClient, settings: GatewaySettings | None = None, start_timeout: float = 30
) -> Iterator[Server]:
    """build_app + uvicorn on a random free port, in a thread; stopped (lifespan exit) after."""
    settings = settings or GatewaySettings()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings.port = port
    app = build_app(engine, settings)
    config = uvicorn_config(app, settings, log_level="warning")
    server = GatewayServer(config, app.state.drain)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield Server("127.0.0.1", port, app, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class WS:
    """A blocking socket client that keeps every frame it got, by stream."""

    def __init__(self, url: str, **kw: Any):
        self.conn: ClientConnection = connect(url, open_timeout=10, max_size=None, **kw)
        self.frames: list[dict[str, Any]] = []
        self.messages = 0  # WebSocket messages received
        self.batches: list[int] = []  # frames in each batch message received
        self._unread: list[dict[str, Any]] = []
        self.session = self.recv()
        assert self.session["type"] == "session", self.session
        assert self.messages == 1 and not self.batches, "the session frame comes alone"

    def send(self, obj: Any) -> None:
        self.conn.send(obj if isinstance(obj, (str, bytes)) else orjson.dumps(obj).decode())

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        """The next frame (the frames of a batch message one by one)."""
        if not self._unread:
            msg = orjson.loads(self.conn.recv(timeout=timeout))
            self.messages += 1
            if msg.get("type") == "batch":
                assert len(msg["frames"]) > 1, "a batch of one should be a plain frame"
                self.batches.append(len(msg["frames"]))
                self._unread = list(msg["frames"])
            else:
                self._unread = [msg]
        f = self._unread.pop(0)
        self.frames.append(f)
        return f

    def until(self, pred, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv(max(0.01, deadline - time.monotonic()))
            if pred(f):
                return f

    def until_done(self, ids, timeout: float = 30) -> None:
        left = set(ids)
        deadline = time.monotonic() + timeout
        while left:
            f = self.recv(max(0.01, deadline - time.monotonic()))
            if f["type"] == "done":
                left.discard(f["id"])

    def of(self, id: Any, type: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("id") == id and (type is None or f["type"] == type)]

    def text(self, id: Any, index: int = 0) -> str:
        return "".join(f["text"] for f in self.of(id, "delta") if f["index"] == index)

    def done(self, id: Any) -> dict[str, Any]:
        (d,) = self.of(id, "done")
        return d

    def close(self) -> None:
        self.conn.close()


# ---- a fake engine -----------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (ids = code points mod 4096)."""

    chat_template = "fake"
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 4096 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        s = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return s + ("<assistant>" if add_generation_prompt else "")

    def __len__(self) -> int:
        return 4096


def fake_text(prompt_ids: list[int], index: int, length: int) -> str:
    base = sum(prompt_ids) + 7 * index
    return "".join(chr(ord("a") + (base + i) % 26) for i in range(length))


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int


@dataclass
class FakeModelConfig:
    served_model_name: str
    max_model_len: int


@dataclass
class FakeEngine:
    """An EngineClient that generates fake_text, one character per step of `step_s` seconds;
    DELTA outputs (to the sink when one is given, as AsyncLLMEngine does)."""

    step_s: float = 0.005
    max_model_len: int = 512
    errored: bool = False  # set by tests: the engine "died"
    active: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    started: bool = False
    stopped: bool = False
    reply: str | None = None  # set: every sequence is this text (else fake_text), cut at max_tokens

    def __post_init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.model_config: FakeModelConfig | None = FakeModelConfig(
            "fake-model", self.max_model_len
        )
        self.vocab_size: int | None = 4096

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    def stats(self) -> FakeStats:
        return FakeStats(len(self.active), 0, 100, 100 - len(self.active))

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.active.discard(request_id)
            self.aborted.append(request_id)

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        params = sampling_params or SamplingParams()
        if self.errored:
            raise RuntimeError("engine dead")
        ids = prompt["prompt_token_ids"]
        assert params.output_kind is RequestOutputKind.DELTA
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        if self.reply is not None:
            max_tokens = min(max_tokens, len(self.reply))
            texts = [self.reply] * params.n
        else:
            texts = [fake_text(ids, k, max_tokens) for k in range(params.n)]
        rid = request_id or "r"
        self.active.add(rid)
        try:
            for i in range(max_tokens):
                await anyio.sleep(self.step_s)
                if rid not in self.active:
                    return
                if self.errored:
                    raise RuntimeError("engine died mid-stream")
                last = i == max_tokens - 1
                outs = [
                    CompletionOutput(
                        k, texts[k][i], [ord(texts[k][i])], None, None, "length" if last else None
                    )
                    for k in range(params.n)
                ]
                out = RequestOutput(rid, None, ids, outs, finished=last)
                if sink is not None:
                    sink(out)
                else:
                    yield out
        finally:
            self.active.discard(rid)


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float, poll: float = 0.1) -> None:
    """Until `asyncllm serve` (started as `proc`) answers 200 on /health at `base`; fails with
    its output if it exits first, or after `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(poll)
