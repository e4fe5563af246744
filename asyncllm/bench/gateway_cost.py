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

With --requests > --streams the requests come in waves (at most --streams in flight, a new one
as soon as one ends), as in the device benchmark (ops/bench/device_serving.sh), and the stub
reports what the turnover costs the engine: `occupancy` (slot-seconds filled / (streams x span,
first arrival to last finish)) and `admit_steps` (steps that admitted a new request: on a GPU
such a step is a mixed prefill+decode step, run eager, several times a graphed decode step;
`--admit-step-ms` makes the stub's cost the same). `--anchor` runs the same workload straight
into AsyncLLMEngine (generate(sink=...), the device benchmark's engine-sink mode) for the ratio.

  python -m asyncllm.bench.gateway_cost --streams 256 --tokens 64 [--engine-process]
  python -m asyncllm.bench.gateway_cost --streams 64 --requests 512 --tokens 128 --step-ms 2 \
      --engine-process [--anchor]
The engine loop's admission window comes from the environment (ASYNCLLM_ADMIT_COALESCE_MS,
ASYNCLLM_ADMIT_QUIET_MS), in both runs; the result records it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from asyncllm import envs
from asyncllm.outputs import CompletionOutput, EngineStats, RequestOutput
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


@dataclass
class StubStats(EngineStats):
    """EngineStats plus the stub's turnover accounting, pickled up from an engine process."""

    slot_s: float = 0.0  # sum over steps of running requests x step duration
    first_add: float | None = None  # perf_counter (system-wide monotonic) of the first arrival
    last_finish: float | None = None
    admit_steps: int = 0  # steps that admitted at least one new request
    admitted: int = 0
    # For each request added after the first finish: ms from the end of the step that last
    # finished a request to its arrival here (the turnover: done out, new request in).
    turnover_ms: list[float] = field(default_factory=list)

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


class StubLLMEngine:
    """LLMEngine's interface, no model: each step every request gets one token (DELTA)."""

    def __init__(self, step_s: float, admit_step_s: float | None = None):
        self.step_s = step_s
        self.admit_step_s = step_s if admit_step_s is None else admit_step_s
        self.new = 0  # requests added since the last step (prefilled by the next one)
        self.acc = StubStats(0, 0, 1000, 1000, 0, 0, 0, 0, 0, 0, 0)
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
        self.new += 1
        now = time.perf_counter()
        if self.acc.first_add is None:
            self.acc.first_add = now
        if self.acc.last_finish is not None:
            self.acc.turnover_ms.append(1e3 * (now - self.acc.last_finish))

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
        n = len(self.requests)
        a = self.acc
        return StubStats(
            num_running=n, num_waiting=0, kv_blocks_total=1000, kv_blocks_free=1000 - n,
            kv_blocks_cached=0, num_preemptions=0, prompt_tokens_total=0,
            generation_tokens_total=0, prefix_cache_hit_tokens=0, num_steps=self.steps,
            num_requests=n, slot_s=a.slot_s, first_add=a.first_add, last_finish=a.last_finish,
            admit_steps=a.admit_steps, admitted=a.admitted, turnover_ms=list(a.turnover_ms),
        )  # fmt: skip

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        admitting, self.new = self.new, 0
        # The GPU's share of a step (the GIL is free meanwhile); a step that admits a request
        # is a mixed prefill step, run eager on a GPU.
        time.sleep(self.admit_step_s if admitting else self.step_s)
        self.steps += 1
        running = len(self.requests)
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
        t1 = time.perf_counter()
        a = self.acc
        a.slot_s += running * (t1 - t0)
        if admitting:
            a.admit_steps += 1
            a.admitted += admitting
        if outs and any(o.finished for o in outs):
            a.last_finish = t1
        return outs


def stub_engine(step_s: float, admit_step_s: float | None, args: Any) -> StubLLMEngine:
    """The engine factory for --engine-process (top level: it is pickled to the child)."""
    return StubLLMEngine(step_s, admit_step_s)


PIECE_GAP_MS = 0.1


def turnover(before: Any, after: Any, streams: int) -> dict[str, Any]:
    """The stub's accounting over one run (differences of two StubStats snapshots)."""
    span = (after.last_finish or 0.0) - (after.first_add or 0.0)
    if before is not None and before.last_finish is not None:
        raise RuntimeError("the stub ran requests before the measured run")
    steps = after.num_steps - (before.num_steps if before else 0)
    t = sorted(after.turnover_ms)

    def q(f: float) -> float | None:
        return t[min(len(t) - 1, int(f * len(t)))] if t else None

    # How a wave's replacements reach the engine: in arrival order their turnover grows within
    # a wave and drops at the next; a gap over PIECE_GAP_MS starts a new piece (the commands of
    # one pipe message arrive microseconds apart).
    raw = after.turnover_ms
    waves, pieces, gaps = 0, 0, []
    for i, x in enumerate(raw):
        d = x - raw[i - 1] if i else -1.0
        if d < 0:
            waves += 1
            pieces += 1
        elif d > PIECE_GAP_MS:
            pieces += 1
            gaps.append(d)
    gaps.sort()

    def g(f: float) -> float | None:
        return gaps[min(len(gaps) - 1, int(f * len(gaps)))] if gaps else None

    return {
        "turnover_ms": {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": q(1.0)},
        "pieces_per_wave": pieces / waves if waves else None,
        "piece_gap_ms": {"p10": g(0.1), "p50": g(0.5), "p90": g(0.9), "max": g(1.0)},
        "engine_steps": steps,
        "admit_steps": after.admit_steps,
        "admitted": after.admitted,
        "engine_span_s": span,
        "occupancy": after.slot_s / (streams * span) if span > 0 else None,
    }


def _thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def _make_engine(args: argparse.Namespace) -> tuple[Any, StubLLMEngine | None]:
    from asyncllm.bench import gateway_cost as me  # pickled by its module name, not __main__
    from asyncllm.config import EngineArgs
    from asyncllm.engine.async_engine import AsyncLLMEngine

    step, admit = args.step_ms / 1e3, (args.admit_step_ms or args.step_ms) / 1e3
    if args.engine_process:
        factory = functools.partial(me.stub_engine, step, admit)
        eargs = EngineArgs(engine_process=True)
        return AsyncLLMEngine(engine_args=eargs, engine_factory=factory), None
    stub = me.StubLLMEngine(step, admit)
    return AsyncLLMEngine(engine=stub), stub


def _engine_thread(engine: Any) -> threading.Thread | None:
    """The thread of this process that takes the engine's outputs: the engine thread, or with
    an engine process the receiver thread (unpickling the child's output batches)."""
    t = engine._transport
    return getattr(t, "thread", None) or getattr(t, "receiver", None)


def run_anchor(args: argparse.Namespace) -> dict[str, Any]:
    """The same workload straight into AsyncLLMEngine, generate(sink=...) (the device
    benchmark's engine-sink mode): no server, no sockets."""
    from asyncllm.bench.serving import EngineDriver, drive, make_prompts, summarize

    engine, _ = _make_engine(args)

    async def go() -> dict[str, Any]:
        async with engine:
            before = engine.stats()
            th = _engine_thread(engine)
            assert th is not None and th.ident is not None
            prompts = make_prompts(args.requests, 64, 0)
            c0, e0 = time.process_time(), _thread_cpu(th.ident)
            results, wall = await drive(
                prompts, float("inf"), args.streams, 0, EngineDriver(engine, args.tokens, True)
            )
            cpu, ecpu = time.process_time() - c0, _thread_cpu(th.ident) - e0
            await asyncio.sleep(0.2)  # the stats of the last step
            run = summarize("engine-sink", float("inf"), args.streams, results, wall)
            run["process_cpu_s"] = cpu
            run["engine_thread_cpu_s"] = ecpu
            run.update(turnover(None if before.first_add is None else before, engine.stats(),
                                args.streams))  # fmt: skip
            return run

    return asyncio.run(go())


def run_ws(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import uvicorn

    from asyncllm.gateway import GatewaySettings, build_app, uvicorn_config

    engine, stub = _make_engine(args)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = GatewaySettings(port=port, max_streams_per_connection=1024, max_queue=1 << 16)
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
    while _engine_thread(engine) is None:  # the lifespan starts the engine (and its process)
        time.sleep(0.01)
    engine_thread = _engine_thread(engine)
    assert engine_thread is not None and loop_thread.ident is not None
    assert engine_thread.ident is not None
    before = engine.stats()

    out = f"/tmp/asyncllm-gateway-cost-client-{port}.json"
    cmd = [
        sys.executable, "-m", "asyncllm.bench.serving", "--url", f"http://127.0.0.1:{port}", "--modes", "ws",
        "--concurrency", str(args.streams), "--num-requests", str(args.requests),
        "--output-len", str(args.tokens), "--warmup", "0", "--no-plot",
        "--streams-per-socket", str(args.streams_per_socket), "--out", out,
    ] + (["--no-ws-batch"] if args.no_ws_batch else [])  # fmt: skip
    c0 = (_thread_cpu(loop_thread.ident), _thread_cpu(engine_thread.ident))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c1 = (_thread_cpu(loop_thread.ident), _thread_cpu(engine_thread.ident))
    time.sleep(0.2)  # the stats of the last step
    after = engine.stats()
    server.should_exit = True
    loop_thread.join(30)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(1)
    client = json.loads(Path(out).read_text())["runs"][0]
    tokens = args.requests * args.tokens
    res = {k: client[k] for k in ("delivered_tok_s", "duration_s", "ttft_ms", "tpot_ms", "errors")}
    res.update(
        {
            "client_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
            "client_run_cpu_s": client.get("bench_process_cpu_s"),
            "client_wall_s": wall,
            "loop_cpu_us_per_token": (c1[0] - c0[0]) / tokens * 1e6,
            "engine_thread_cpu_us_per_token": (c1[1] - c0[1]) / tokens * 1e6,
            "steps": None if stub is None else stub.steps,
        }
    )
    res.update(turnover(None if before.first_add is None else before, after, args.streams))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=256, help="in flight at once")
    p.add_argument("--requests", type=int, default=None, help="in all (default: --streams)")
    p.add_argument("--tokens", type=int, default=64, help="per stream")
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument(
        "--admit-step-ms", type=float, default=None, help="a step that admits (default: --step-ms)"
    )
    p.add_argument("--engine-process", action="store_true", help="the stub in a child process")
    p.add_argument("--anchor", action="store_true", help="also the engine-sink anchor, first")
    p.add_argument("--streams-per-socket", type=int, default=64)
    p.add_argument("--ws-impl", default=None, help="uvicorn's ws implementation (default: auto)")
    p.add_argument("--no-ws-batch", action="store_true", help="one WebSocket message per frame")
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval in the server (this) process: how soon the loop hands the GIL"
        " to the engine's sender and receiver threads (Python's default 5 ms)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="write the loop thread's cProfile stats here")
    args = p.parse_args(argv)
    args.requests = args.requests or args.streams
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)

    res: dict[str, Any] = {
        "benchmark": "gateway_cost",
        "streams": args.streams,
        "requests": args.requests,
        "tokens_per_stream": args.tokens,
        "step_ms": args.step_ms,
        "admit_step_ms": args.admit_step_ms or args.step_ms,
        "tokens": args.requests * args.tokens,
        "engine_process": args.engine_process,
        "ws_batch_frames": not args.no_ws_batch,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        # The engine loop's admission window (the child reads the same environment).
        "admit_coalesce_ms": envs.admit_coalesce_ms(),
        "admit_quiet_ms": envs.admit_quiet_ms(),
    }
    if args.anchor:
        a = run_anchor(args)
        res["anchor"] = {
            k: a[k]
            for k in (
                "delivered_tok_s", "duration_s", "errors", "process_cpu_s", "engine_thread_cpu_s",
                "engine_steps", "admit_steps", "engine_span_s", "occupancy", "turnover_ms",
                "pieces_per_wave", "piece_gap_ms",
            )
        }  # fmt: skip
        res["anchor"]["ttft_p50_ms"] = a["ttft_ms"]["p50"]
        res["anchor"]["tpot_p50_ms"] = a["tpot_ms"]["p50"]
    w = run_ws(args)
    w["ttft_p50_ms"], w["tpot_p50_ms"] = w.pop("ttft_ms")["p50"], w.pop("tpot_ms")["p50"]
    res["ws"] = w
    if args.anchor:
        res["ws_over_anchor_tok_s"] = w["delivered_tok_s"] / res["anchor"]["delivered_tok_s"]
        if w["occupancy"] and res["anchor"]["occupancy"]:
            res["ws_over_anchor_occupancy"] = w["occupancy"] / res["anchor"]["occupancy"]
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
