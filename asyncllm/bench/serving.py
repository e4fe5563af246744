"""Serving benchmark: the gateway under load, against the engine driven directly, in one run.

The same workload (text prompts, `output_len` tokens each with EOS ignored, greedy) is offered
three ways:
  engine  AsyncLLMEngine.generate in this process (no gateway), one `async for` per request:
          the baseline, as an application would use the engine
  engine-sink  the same with generate(sink=...): outputs by callback in the engine's drain, the
          cheapest way in (the gateway's own), a stricter baseline
  ws      WebSocket /v1/ws, streams multiplexed over a few sockets (`complete` frames)
  http    the OpenAI API, POST /v1/completions with stream=true (one connection per request)
Requests arrive as a Poisson process at `rate` req/s (inf: all at once) and at most
`concurrency` are in flight (later arrivals wait for a slot, as in a client's connection pool).
Per run it reports time to first token, inter-chunk latency, time per output token and end-to-end
latency (mean/p50/p90/p99, ms), delivered tokens/s and errors; per load point the gateway's cost
as ratios to the engine (tok/s ratio, added p99 latency). Results go to a JSON file and a PNG.

Without --url the benchmark starts the server itself (`asyncllm serve` in a subprocess, the same
engine flags) after the engine-direct runs, so server and load generator do not share an event
loop. With --url it measures a running server (ws/http only: no engine baseline).

  python -m asyncllm.bench.serving --model DIR --device cpu --concurrency 16,64,256 --rates inf
  asyncllm bench serving --url http://127.0.0.1:8000 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncllm import envs
from asyncllm.bench.results import RESULTS_DIR

ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages when installed
RESULTS = RESULTS_DIR
MODES = ("engine", "engine-sink", "ws", "http")
ANCHORS = ("engine", "engine-sink")  # engine-direct modes the gateway's are compared against
TARGET_TOK_S_RATIO = 0.95  # delivered tok/s through the gateway vs the engine, at 256 streams
TARGET_ADDED_P99_MS = 5.0
TARGET_CONCURRENCY = 256

_WORDS = (
    "the a model token stream socket server client engine batch cache block page queue "
    "latency throughput request reply session resume cancel river mountain city garden "
    "music paper window light story question answer number letter color water fire"
).split()


# ---- workload ----------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # when it was sent (after waiting for a concurrency slot)
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks carrying text
    tokens: int = 0
    end: float = 0.0

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.start if self.chunks else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    """Distinct random word sequences: every request pays its own prefill (no shared prefix
    beyond the first word's block)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) for i in range(n)]


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Inter-arrival times of a Poisson process (exponential gaps); all zero when rate is inf."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


async def drive(
    prompts: Sequence[str],
    rate: float,
    concurrency: int,
    seed: int,
    one: Callable[[int, str, RequestResult], Awaitable[None]],
) -> tuple[list[RequestResult], float]:
    """Offer the prompts at Poisson arrivals, at most `concurrency` in flight.
    Returns the results and the wall time from the first send to the last finish."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    slots = asyncio.Semaphore(concurrency)
    results = [RequestResult() for _ in prompts]

    async def run(i: int) -> None:
        async with slots:
            r = results[i]
            r.start = time.perf_counter()
            try:
                await one(i, prompts[i], r)
            except Exception as e:  # one failed request is a data point, not the end of the run
                r.ok, r.error = False, f"{type(e).__name__}: {e}"
            r.end = time.perf_counter()

    tasks = []
    for i, gap in enumerate(arrival_gaps(len(prompts), rate, seed)):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(run(i)))
    await asyncio.gather(*tasks)
    t0 = min(r.start for r in results)
    t1 = max(r.end for r in results)
    return results, t1 - t0


# ---- statistics --------------------------------------------------------------------------------


def percentiles(xs: Sequence[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99 in milliseconds (linear interpolation, as numpy's default)."""
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(xs)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {
        "mean": 1000 * sum(s) / len(s),
        "p50": 1000 * q(0.50),
        "p90": 1000 * q(0.90),
        "p99": 1000 * q(0.99),
    }


def summarize(
    mode: str, rate: float, concurrency: int, results: list[RequestResult], wall: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    tpot = [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in ok if r.tokens > 1 and r.chunks]
    return {
        "mode": mode,
        "rate": "inf" if math.isinf(rate) else rate,
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(e for e in errors if e))[:5],
        "duration_s": wall,
        "output_tokens": tokens,
        "delivered_tok_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": percentiles([g for r in ok for g in r.gaps()]),
        "tpot_ms": percentiles(tpot),
        "e2e_ms": percentiles([r.end - r.start for r in ok]),
    }


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each load point with an engine-direct run: each gateway mode's cost relative to it
    (one row per gateway run and anchor mode)."""
    out = []
    for anchor in ANCHORS:
        out += _compare_to(runs, anchor)
    return out


def _compare_to(runs: list[dict[str, Any]], anchor: str) -> list[dict[str, Any]]:
    out = []
    base = {(r["rate"], r["concurrency"]): r for r in runs if r["mode"] == anchor}
    for r in runs:
        b = base.get((r["rate"], r["concurrency"]))
        if r["mode"] in ANCHORS or b is None:
            continue

        def added(metric: str, r: dict[str, Any] = r, b: dict[str, Any] = b) -> float | None:
            x, y = r[metric]["p99"], b[metric]["p99"]
            return None if x is None or y is None else x - y

        ratio = None
        if b["delivered_tok_s"] and r["delivered_tok_s"] is not None:
            ratio = r["delivered_tok_s"] / b["delivered_tok_s"]
        out.append(
            {
                "mode": r["mode"],
                "anchor": anchor,
                "rate": r["rate"],
                "concurrency": r["concurrency"],
                "tok_s_ratio": ratio,
                "added_ttft_p99_ms": added("ttft_ms"),
                "added_itl_p99_ms": added("itl_ms"),
                "added_tpot_p99_ms": added("tpot_ms"),
            }
        )
    return out


def targets(comparison: list[dict[str, Any]], anchor: str = "engine") -> dict[str, Any]:
    at = [
        c
        for c in comparison
        if c["mode"] == "ws"
        and c.get("anchor", "engine") == anchor
        and c["concurrency"] == TARGET_CONCURRENCY
    ]
    res: dict[str, Any] = {
        "anchor": anchor,
        "tok_s_ratio_min": TARGET_TOK_S_RATIO,
        "added_p99_ms_max": TARGET_ADDED_P99_MS,
        "at_concurrency": TARGET_CONCURRENCY,
        "mode": "ws",
        "measured": bool(at),
    }
    if at:
        res["tok_s_ratio_met"] = all((c["tok_s_ratio"] or 0) >= TARGET_TOK_S_RATIO for c in at)
        res["added_itl_p99_met"] = all(
            (c["added_itl_p99_ms"] or 0) <= TARGET_ADDED_P99_MS for c in at
        )
    return res


# ---- the three ways in -------------------------------------------------------------------------


class EngineDriver:
    """AsyncLLMEngine in this process: what the gateway's cost is measured against. With
    `sink`, outputs come by callback (generate(sink=...)) instead of one `async for` step each."""

    def __init__(self, engine: Any, output_len: int, sink: bool = False):
        self.sink = sink
        from asyncllm.sampling_params import RequestOutputKind, SamplingParams

        self.engine = engine
        self.params = SamplingParams(
            max_tokens=output_len,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        self._n = 0

    async def engine_steps(self) -> int | None:
        return getattr(self.engine.stats(), "num_steps", None)

    async def __call__(self, i: int, prompt: str, r: RequestResult) -> None:
        self._n += 1

        def take(out: Any) -> None:
            n = len(out.outputs[0].token_ids)
            if n:
                r.chunks.append(time.perf_counter())
                r.tokens += n
            if out.finished:
                reason = out.outputs[0].finish_reason
                r.ok = reason == "length"
                if not r.ok:
                    r.error = f"finish_reason {reason}"

        rid = f"bench-{self._n}"
        if self.sink:
            async for _ in self.engine.generate(prompt, self.params, request_id=rid, sink=take):
                pass
            return
        async for out in self.engine.generate(prompt, self.params, request_id=rid):
            take(out)


class WSDriver:
    """Streams multiplexed over sockets of up to `per_socket` streams each, opened lazily."""

    def __init__(
        self, url: str, output_len: int, per_socket: int, api_key: str | None, batch: bool = True
    ):
        # batch: ask for batch frames (?batch=1), as asyncllm.client and the chat page do
        self.url = url + ("?batch=1" if batch else "")
        self.per_socket = per_socket
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.params = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
        self.sockets: list[_Socket] = []
        self._lock = asyncio.Lock()
        self._n = 0
        self.metrics_url = url.split("/v1/ws", 1)[0].replace("ws", "http", 1) + "/metrics"
        self.headers_http = self.headers

    async def engine_steps(self) -> int | None:
        """The server's asyncllm_engine_steps gauge (None: a server without it)."""
        return await asyncio.to_thread(_scrape_steps, self.metrics_url, self.headers_http)

    async def _socket(self) -> _Socket:
        async with self._lock:
            for s in self.sockets:
                if s.alive and s.reserved < self.per_socket:
                    s.reserved += 1
                    return s
            s = await _Socket.open(self.url, self.headers)
            self.sockets.append(s)
            s.reserved += 1
            return s

    async def prepare(self, concurrency: int) -> None:
        """Open every socket the run will use before it starts (not timed)."""
        want = -(-concurrency // self.per_socket)
        async with self._lock:
            self.sockets = [s for s in self.sockets if s.alive]
            while len(self.sockets) < want:
                self.sockets.append(await _Socket.open(self.url, self.headers))

    async def __call__(self, i: int, prompt: str, r: RequestResult) -> None:
        self._n += 1
        sid = f"b{self._n}"
        sock = await self._socket()
        try:
            frame = {"type": "complete", "id": sid, "prompt": prompt, "params": self.params}
            await sock.run(sid, frame, r)
        finally:
            sock.reserved -= 1

    async def close(self) -> None:
        for s in self.sockets:
            await s.close()
        self.sockets.clear()


def _scrape_steps(url: str, headers: dict[str, str]) -> int | None:
    import httpx

    try:
        text = httpx.get(url, headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("asyncllm_engine_steps "):
            return int(float(line.split()[1]))
    return None


class _Socket:
    def __init__(self, conn: Any):
        self.conn = conn
        self.streams: dict[str, tuple[RequestResult, asyncio.Future[None]]] = {}
        self.alive = True
        self.reserved = 0  # streams placed on this socket, including ones not sent yet
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> _Socket:
        from websockets.asyncio.client import connect

        conn = await connect(
            url, additional_headers=headers, max_size=None, ping_interval=None, open_timeout=30
        )
        first = json.loads(await conn.recv())
        if first.get("type") != "session":
            raise RuntimeError(f"expected a session frame, got {first}")
        return cls(conn)

    async def run(self, sid: str, frame: dict[str, Any], r: RequestResult) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams[sid] = (r, fut)
        try:
            await self.conn.send(json.dumps(frame))
            await fut
        finally:
            self.streams.pop(sid, None)

    async def _read(self) -> None:
        import orjson

        try:
            async for data in self.conn:
                now = time.perf_counter()
                msg = orjson.loads(data)
                for f in msg["frames"] if msg["type"] == "batch" else (msg,):
                    self._frame(f, now)
        except Exception as e:
            err = f"socket lost: {type(e).__name__}: {e}"
        else:
            err = "socket closed"
        self.alive = False
        for r, fut in list(self.streams.values()):
            r.error = r.error or err
            if not fut.done():
                fut.set_result(None)

    def _frame(self, f: dict[str, Any], now: float) -> None:
        entry = self.streams.get(f.get("id"))
        if entry is None:
            return
        r, fut = entry
        t = f["type"]
        if t == "delta":
            if f["text"]:
                r.chunks.append(now)
        elif t == "done":
            r.tokens = f["usage"]["completion_tokens"]
            r.ok = f["finish_reason"] == "length"
            if not r.ok and r.error is None:
                r.error = f"finish_reason {f['finish_reason']}: {f.get('error')}"
            if not fut.done():
                fut.set_result(None)
        elif t == "error":
            r.error = f"{f['code']}: {f['message']}"

    async def close(self) -> None:
        await self.conn.close()
        await self.reader


class HTTPDriver:
    """OpenAI /v1/completions with stream=true, one HTTP request per benchmark request."""

    def __init__(self, base: str, output_len: int, concurrency: int, api_key: str | None):
        import httpx

        self.client = httpx.AsyncClient(
            base_url=base,
            timeout=httpx.Timeout(None, connect=30),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )
        self.body = {
            "max_tokens": output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def __call__(self, i: int, prompt: str, r: RequestResult) -> None:
        import orjson

        body = dict(self.body, prompt=prompt)
        async with self.client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"]))
                for c in chunk.get("choices") or []:
                    if c.get("text"):
                        r.chunks.append(now)
                    if c.get("finish_reason"):
                        r.ok = c["finish_reason"] == "length"
                if chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
        if not r.ok and r.error is None:
            r.error = "stream ended without finish_reason length"

    async def close(self) -> None:
        await self.client.aclose()


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Plan:
    modes: list[str]
    rates: list[float]
    concurrencies: list[int]
    num_requests: int
    prompt_words: int
    output_len: int
    per_socket: int
    seed: int
    warmup: int
    ws_batch: bool = True

    def points(self) -> list[tuple[float, int]]:
        return [(r, c) for c in self.concurrencies for r in self.rates]


async def sweep(plan: Plan, mode: str, driver: Any) -> list[dict[str, Any]]:
    runs = []
    if plan.warmup:
        warm = make_prompts(plan.warmup, plan.prompt_words, plan.seed + 999)
        await drive(warm, math.inf, plan.warmup, plan.seed, driver)
    for k, (rate, conc) in enumerate(plan.points()):
        prompts = make_prompts(plan.num_requests, plan.prompt_words, plan.seed + k)
        prepare = getattr(driver, "prepare", None)
        if prepare is not None:
            await prepare(conc)  # e.g. open the sockets: a chat frontend's are open already
        steps = getattr(driver, "engine_steps", None)
        steps0 = await steps() if steps is not None else None
        cpu0 = time.process_time()
        results, wall = await drive(prompts, rate, conc, plan.seed + k, driver)
        cpu = time.process_time() - cpu0
        run = summarize(mode, rate, conc, results, wall)
        run["bench_process_cpu_s"] = cpu
        if steps0 is not None:
            # Engine steps the run took; tokens / concurrency would be every batch full, so
            # more steps mean batches ran short of requests (turnover between requests).
            await asyncio.sleep(0.1)  # the last step's stats
            steps1 = await steps()  # type: ignore[misc]
            run["engine_steps"] = None if steps1 is None else steps1 - steps0
            run["ideal_steps"] = run["output_tokens"] / conc
        runs.append(run)
        _log(
            f"{mode:6s} rate={run['rate']} conc={conc}: {run['completed']}/{run['requests']} ok, "
            f"{run['delivered_tok_s']:.1f} tok/s, ttft p50/p99 "
            f"{_ms(run['ttft_ms']['p50'])}/{_ms(run['ttft_ms']['p99'])} ms, itl p50/p99 "
            f"{_ms(run['itl_ms']['p50'])}/{_ms(run['itl_ms']['p99'])} ms"
        )
    return runs


async def run_engine_direct(plan: Plan, engine_args: Any) -> tuple[list[dict[str, Any]], dict]:
    from asyncllm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(engine_args)
    async with engine:
        info = {
            "served_model_name": engine.model_config.served_model_name,
            "max_model_len": engine.model_config.max_model_len,
            "dtype": str(engine.model_config.dtype),
            "device": str(engine.model_config.device),
        }
        runs = []
        for mode in ANCHORS:
            if mode in plan.modes:
                sink = mode == "engine-sink"
                runs += await sweep(plan, mode, EngineDriver(engine, plan.output_len, sink))
    return runs, info


async def run_gateway(plan: Plan, base: str, api_key: str | None) -> list[dict[str, Any]]:
    runs = []
    ws_url = base.replace("http", "ws", 1).rstrip("/") + "/v1/ws"
    if "ws" in plan.modes:
        d = WSDriver(ws_url, plan.output_len, plan.per_socket, api_key, plan.ws_batch)
        try:
            runs += await sweep(plan, "ws", d)
        finally:
            await d.close()
    if "http" in plan.modes:
        h = HTTPDriver(base, plan.output_len, max(plan.concurrencies), api_key)
        try:
            runs += await sweep(plan, "http", h)
        finally:
            await h.close()
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_flags: list[str], model: str | None, plan: Plan) -> tuple[Any, str]:
    """`asyncllm serve` in a subprocess, with limits wide enough for the whole workload."""
    port = _free_port()
    streams = max(plan.per_socket, 1)
    cmd = [
        sys.executable,
        "-c",
        "import sys, asyncllm.cli as c; sys.exit(c.main(sys.argv[1:]))",
        "serve",
        *([model] if model else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
        "--log-level",
        "warning",
        "--max-queue",
        str(max(1024, 2 * plan.num_requests)),
        "--max-connections",
        str(max(1024, 2 * max(plan.concurrencies))),
        "--max-streams-per-connection",
        str(streams),
        *engine_flags,
    ]
    env = dict(os.environ, ASYNCLLM_API_KEYS="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc)
    return proc, base


def wait_healthy(base: str, proc: Any | None = None, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} not healthy after {timeout} s")


def stop_server(proc: Any) -> None:
    proc.terminate()  # uvicorn exits gracefully on SIGTERM; the lifespan stops the engine
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def remote_model(base: str, api_key: str | None) -> str | None:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        return r.json()["data"][0]["id"]
    except Exception:  # the name is a label; the run does not need it
        return None


def _commit() -> str:
    try:
        from asyncllm.bench.results import git_commit
    except ImportError:  # run as a file from elsewhere: no package on the path
        return envs.commit() or "unknown"
    return git_commit()


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        info["cpu"] = platform.processor() or None
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency against load: TTFT and inter-chunk latency (p50, p99) per mode, against the
    delivered token rate of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = {"engine": "#1f77b4", "engine-sink": "#9467bd", "ws": "#d62728", "http": "#2ca02c"}
    for mode in MODES:
        runs = sorted(
            (r for r in result["runs"] if r["mode"] == mode and r["delivered_tok_s"]),
            key=lambda r: (r["concurrency"], r["requests_per_s"]),
        )
        if not runs:
            continue
        x = [r["concurrency"] for r in runs]
        rates = {r["rate"] for r in runs}
        use_conc = len(set(x)) > 1 or len(rates) == 1
        xs = x if use_conc else [r["requests_per_s"] for r in runs]
        for ax, metric in ((axes[0], "ttft_ms"), (axes[1], "itl_ms")):
            for q, style in (("p50", "-"), ("p99", "--")):
                ax.plot(
                    xs,
                    [r[metric][q] for r in runs],
                    style,
                    marker="o",
                    color=colors[mode],
                    label=f"{mode} {q}",
                )
        axes[2].plot(
            xs, [r["delivered_tok_s"] for r in runs], marker="o", color=colors[mode], label=mode
        )
        for ax in axes:
            ax.set_xlabel("concurrent streams" if use_conc else "achieved requests/s")
            if use_conc:
                ax.set_xscale("log", base=2)
    axes[0].set_title("time to first token (ms)")
    axes[1].set_title("inter-chunk latency (ms)")
    axes[2].set_title("delivered tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hw = result["hardware"]
    fig.suptitle(
        f"asyncllm serving: {result['model']} on {hw.get('gpu') or hw.get('cpu')}"
        f" - {result['workload']['output_len']} output tokens/request",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _engine_flags(ns: argparse.Namespace) -> list[str]:
    """The engine flags given to this command, for `asyncllm serve`."""
    out = []
    for k, v in sorted(vars(ns).items()):
        if not k.startswith("engine_"):
            continue
        flag = "--" + k[len("engine_") :].replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def _floats(s: str) -> list[float]:
    return [math.inf if x.strip() in ("inf", "max") else float(x) for x in s.split(",")]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
    from asyncllm.cli_flags import add_engine_args

    p = argparse.ArgumentParser(
        prog="asyncllm bench serving",
        description="The gateway (WebSocket, OpenAI HTTP) under load vs the engine driven directly.",
    )
    p.add_argument(
        "--model", default=None, help="HF dir, hub id, .gguf (default: the default model)"
    )
    p.add_argument("--url", default=None, help="a running server (http://host:port): ws/http only")
    p.add_argument("--api-key", default=envs.api_key())
    p.add_argument("--modes", default="engine,engine-sink,ws,http", help="of " + ", ".join(MODES))
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=_ints, default=[256], help="comma list: 16,64,256")
    p.add_argument("--rates", type=_floats, default=[math.inf], help="req/s, comma list; inf")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--streams-per-socket", type=int, default=64)
    p.add_argument(
        "--ws-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for batch frames over WebSocket (as asyncllm.client does); --no-ws-batch: one"
        " message per frame",
    )
    p.add_argument("--warmup", type=int, default=8, help="requests before each mode's runs")
    p.add_argument("--workload-seed", type=int, default=0, help="prompts and arrivals")
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default: ops/bench/results/ in a checkout, else ./bench-results/)",
    )
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--note", default="", help="free text stored in the JSON")
    p.add_argument("--replot", default=None, help="only redraw the PNG of this results JSON")
    add_engine_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.replot:
        src = Path(ns.replot)
        plot(json.loads(src.read_text()), Path(ns.plot) if ns.plot else src.with_suffix(".png"))
        return 0
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"--modes: unknown {bad}; choose from {MODES}", file=sys.stderr)
        return 2
    if ns.url:  # a remote server's engine cannot be driven from here
        modes = [m for m in modes if m not in ANCHORS]
    for name in ("num_requests", "output_len", "prompt_words", "streams_per_socket"):
        if getattr(ns, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if any(c < 1 for c in ns.concurrency) or any(not r > 0 for r in ns.rates):
        print("--concurrency and --rates must be > 0", file=sys.stderr)
        return 2
    plan = Plan(
        modes=modes,
        rates=ns.rates,
        concurrencies=ns.concurrency,
        num_requests=ns.num_requests,
        prompt_words=ns.prompt_words,
        output_len=ns.output_len,
        per_socket=ns.streams_per_socket,
        seed=ns.workload_seed,
        warmup=ns.warmup,
        ws_batch=ns.ws_batch,
    )
    from asyncllm.cli import serve_engine_args

    try:
        # asyncllm serve's defaults (the engine in its own process on a GPU), for both sides.
        engine_args = serve_engine_args(ns)
    except ValueError as e:
        print(f"engine arguments: {e}", file=sys.stderr)
        return 2

    runs: list[dict[str, Any]] = []
    model_info: dict[str, Any] = {}
    if any(m in ANCHORS for m in modes):
        engine_runs, model_info = asyncio.run(run_engine_direct(plan, engine_args))
        runs += engine_runs
    if "ws" in modes or "http" in modes:
        proc = None
        base = ns.url
        if base is None:
            # The engine mode is stated, so the server runs what engine-direct ran.
            flags = _engine_flags(ns) + (
                ["--engine-process" if engine_args.engine_process else "--no-engine-process"]
                if "engine_engine_process" not in vars(ns)
                else []
            )
            proc, base = start_server(flags, ns.model, plan)
        else:
            wait_healthy(base, timeout=30)
            model_info.setdefault("served_model_name", remote_model(base, ns.api_key))
        try:
            runs += asyncio.run(run_gateway(plan, base.rstrip("/"), ns.api_key))
        finally:
            if proc is not None:
                stop_server(proc)

    comparison = compare(runs)
    result = {
        "benchmark": "serving",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _commit(),
        "hardware": hardware(),
        "hardware_scope": (
            "the load generator only: the server at --url may run elsewhere"
            if ns.url
            else "engine, server and load generator (all on this machine)"
        ),
        "model": model_info.get("served_model_name")
        or ns.model
        or "default (SmolLM2-135M-Instruct)",
        "model_info": model_info,
        "engine_args": {
            k: v for k, v in dataclasses.asdict(engine_args).items() if not k.startswith("_")
        },
        "server": ns.url or "asyncllm serve (subprocess, 127.0.0.1)",
        # The engine loop's admission window, here and in the server it starts (inherited).
        "admit_window_ms": {"max": envs.admit_coalesce_ms(), "quiet": envs.admit_quiet_ms()},
        "workload": {
            "num_requests": plan.num_requests,
            "prompt_words": plan.prompt_words,
            "output_len": plan.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "rates": ["inf" if math.isinf(r) else r for r in plan.rates],
            "concurrency": plan.concurrencies,
            "streams_per_socket": plan.per_socket,
            "ws_batch_frames": plan.ws_batch,
            "warmup": plan.warmup,
            "seed": plan.seed,
        },
        "definitions": {
            "ttft_ms": "send -> first chunk with text, per request",
            "itl_ms": "gaps between successive chunks of a request (a chunk may carry >1 token)",
            "tpot_ms": "(last chunk - first chunk) / (tokens - 1), per request",
            "delivered_tok_s": "completion tokens of successful requests / (first send -> last end)",
            "added_*_p99_ms": "p99 through the gateway minus p99 of the engine at the same load",
            "engine_steps": "engine steps during the run (ws: the server's asyncllm_engine_steps"
            " gauge); ideal_steps = output tokens / concurrency, every batch full",
            "bench_process_cpu_s": "CPU time of this process during the run (engine mode: includes"
            " the engine thread; ws/http: the load generator alone, which shares the machine with"
            " the server: near duration_s x cores means the client limited the run)",
        },
        "note": ns.note,
        "runs": runs,
        "comparison": comparison,
        "targets": targets(comparison),
        "targets_vs_engine_sink": targets(comparison, "engine-sink"),
    }
    out = Path(ns.out) if ns.out else RESULTS / default_name(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {out}")
    if not ns.no_plot:
        png = Path(ns.plot) if ns.plot else out.with_suffix(".png")
        plot(result, png)
        _log(f"wrote {png}")
    for c in comparison:
        _log(
            f"{c['mode']} vs {c['anchor']} at rate={c['rate']} conc={c['concurrency']}: tok/s x"
            f"{c['tok_s_ratio']:.3f}, added p99 ttft {_ms(c['added_ttft_p99_ms'])} ms, "
            f"itl {_ms(c['added_itl_p99_ms'])} ms"
        )
    return 0 if all(r["errors"] == 0 for r in runs) else 1


def default_name(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    where = (hw.get("gpu") or "cpu").lower().replace(" ", "-")
    model = Path(str(result["model"])).name.lower().replace(" ", "-")
    return f"serving-{where}-{model}.json"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
