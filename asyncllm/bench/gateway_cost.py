"""The gateway's own host cost per streamed token, without a model.

On a GPU the engine thread's per-step work is Python (the GPU runs asynchronously), and it shares
the GIL with the gateway's event loop: every microsecond the loop spends per frame is taken from
the engine. This measures that microsecond count on any machine, independent of the model and of
how loaded the machine is (it reads thread CPU time, not wall time):

- a stub LLMEngine (no model: each step sleeps `--step-ms`, as a GPU step would with the GIL
  released, then gives every running request one token of text) inside the real AsyncLLMEngine,
  the real app (build_app) and uvicorn, in this process;
- N WebSocket streams from a client in a subprocess (its cost is not counted);
- reported: CPU microseconds per delivered token of the event-loop thread and of the engine
  thread (the stub's own work is small and the same in every variant), and tokens delivered;
  with --engine-process the stub runs in the child process and the second figure is the
  server-side receiver thread (unpickling the child's output batches).

  python -m asyncllm.bench.gateway_cost --streams 256 --tokens 64 [--engine-process]
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from asyncllm.outputs import CompletionOutput, RequestOutput
from asyncllm.sampling_params import RequestOutputKind

_WORD = [" alpha", " beta", " gamma", " delta", " omega"]


class _Tok:
    chat_template = "stub"
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (ord(c) % 250) for c in text[:64]] or [1]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    def __len__(self) -> int:
        return 256


class StubLLMEngine:
    """LLMEngine's interface, no model: each step every request gets one token (DELTA)."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.tokenizer = _Tok()
        self.model_config = SimpleNamespace(served_model_name="stub", max_model_len=4096)
        self.vocab_size = 256
        self.requests: dict[str, Any] = {}
        self.steps = 0

    def apply_chat_template(self, messages, **kw) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))

    def add_request(self, request_id, prompt, params, priority=0, arrival_time=None) -> None:
        ids = (
            prompt["prompt_token_ids"]
            if isinstance(prompt, dict)
            else self.tokenizer.encode(prompt)
        )
        self.requests[request_id] = [params, ids, 0]

    def abort_request(self, request_ids) -> list[RequestOutput]:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        for rid in request_ids:
            r = self.requests.pop(rid, None)
            if r is not None:
                c = CompletionOutput(0, "", [], None, None, "abort")
                outs.append(RequestOutput(rid, None, r[1], [c], finished=True))
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> Any:
        from asyncllm.engine.llm_engine import EngineStats

        n = len(self.requests)
        return EngineStats(
            num_running=n, num_waiting=0, kv_blocks_total=1000, kv_blocks_free=1000 - n,
            kv_blocks_cached=0, num_preemptions=0, prompt_tokens_total=0,
            generation_tokens_total=0, prefix_cache_hit_tokens=0, num_steps=self.steps,
            num_requests=n,
        )  # fmt: skip

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)  # the GPU's share of a step: the GIL is free meanwhile
        self.steps += 1
        outs = []
        for rid, r in list(self.requests.items()):
            params, ids, n = r
            r[2] = n = n + 1
            last = n >= (params.max_tokens or 16)
            assert params.output_kind is RequestOutputKind.DELTA
            c = CompletionOutput(0, _WORD[n % 5], [n % 250], None, None, "length" if last else None)
            outs.append(RequestOutput(rid, None, ids, [c], finished=last))
            if last:
                del self.requests[rid]
        return outs


def stub_engine(step_s: float, args: Any) -> StubLLMEngine:
    """The engine factory for --engine-process (top level: it is pickled to the child)."""
    return StubLLMEngine(step_s)


def _thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="per stream")
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--engine-process", action="store_true", help="the stub in a child process")
    p.add_argument("--ws-impl", default=None, help="uvicorn's ws implementation (default: auto)")
    p.add_argument("--no-ws-batch", action="store_true", help="one WebSocket message per frame")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="write the loop thread's cProfile stats here")
    args = p.parse_args(argv)

    import uvicorn

    from asyncllm.config import EngineArgs
    from asyncllm.engine.async_engine import AsyncLLMEngine
    from asyncllm.gateway import GatewaySettings, build_app, uvicorn_config

    stub = StubLLMEngine(args.step_ms / 1e3)
    if args.engine_process:
        factory = functools.partial(stub_engine, args.step_ms / 1e3)
        engine = AsyncLLMEngine(engine_args=EngineArgs(engine_process=True), engine_factory=factory)
    else:
        engine = AsyncLLMEngine(engine=stub)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = GatewaySettings(port=port, max_streams_per_connection=1024)
    app = build_app(engine, settings)
    kw = {"ws": args.ws_impl} if args.ws_impl else {}
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning", **kw))
    run = server.run
    if args.profile:

        def run(sockets: list[socket.socket]) -> None:
            import cProfile

            prof = cProfile.Profile()
            prof.runcall(server.run, sockets=sockets)
            prof.dump_stats(args.profile)

    loop_thread = threading.Thread(target=run, kwargs={"sockets": [sock]}, daemon=True)
    loop_thread.start()
    while not server.started:
        time.sleep(0.01)
    while engine._thread is None:  # the lifespan starts the engine (and its process)
        time.sleep(0.01)
    engine_thread = engine._thread
    assert engine_thread is not None and loop_thread.ident is not None

    cmd = [
        sys.executable, "-m", "asyncllm.bench.serving", "--url", f"http://127.0.0.1:{port}", "--modes", "ws",
        "--concurrency", str(args.streams), "--num-requests", str(args.streams),
        "--output-len", str(args.tokens), "--warmup", "0", "--no-plot",
        "--out", "/tmp/asyncllm-gateway-cost-client.json",
    ] + (["--no-ws-batch"] if args.no_ws_batch else [])  # fmt: skip
    c0 = (_thread_cpu(loop_thread.ident), _thread_cpu(engine_thread.ident))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    c1 = (_thread_cpu(loop_thread.ident), _thread_cpu(engine_thread.ident))
    server.should_exit = True
    loop_thread.join(30)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return 1
    tokens = args.streams * args.tokens
    res = {
        "benchmark": "gateway_cost",
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "step_ms": args.step_ms,
        "tokens": tokens,
        "engine_process": args.engine_process,
        "ws_batch_frames": not args.no_ws_batch,
        "steps": None if args.engine_process else stub.steps,
        "wall_s": wall,
        "loop_cpu_us_per_token": (c1[0] - c0[0]) / tokens * 1e6,
        "engine_thread_cpu_us_per_token": (c1[1] - c0[1]) / tokens * 1e6,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
