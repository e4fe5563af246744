"""Prometheus metrics for one app. Each app owns its CollectorRegistry, so tests (and programs)
can build many apps in one process without "duplicated timeseries" errors.

The per-token metrics (generated tokens, inter-token latency) are plain counters updated on the
event loop and read by a collector at scrape time: prometheus_client's own metrics take a lock and
check their state on every update, several microseconds each, and on a GPU every microsecond the
loop spends per token is taken from the engine thread (they share the GIL)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class FastCounter:
    """A counter updated from one thread (the event loop): no lock."""

    def __init__(self, name: str, documentation: str):
        self.name, self.documentation = name, documentation
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            self.name, self.documentation, value=self.value, created=self.created
        )


class FastHistogram:
    """A histogram updated from one thread (the event loop): bucket counts in a list, no lock."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (an output that carried several tokens)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += count  # le: bound >= value
        self.sum += value * count

    def family(self) -> HistogramMetricFamily:
        cum, acc = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            acc += n
            cum.append((bound, acc))
        fam = HistogramMetricFamily(self.name, self.documentation, buckets=cum, sum_value=self.sum)
        fam.add_sample(self.name + "_created", {}, self.created)  # as prometheus_client's own
        return fam


class _FastCollector(Collector):
    def __init__(self, metrics: list[FastCounter | FastHistogram]):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for m in self.metrics:
            yield m.family()


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], Any] | None = None):
        self.registry = CollectorRegistry()
        self._stats = stats
        r = self.registry
        self.requests = Counter(
            "asyncllm_requests",
            "Requests finished, by API and outcome",
            ["api", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "asyncllm_errors",
            "Error answers (error frames / HTTP errors), by API and code",
            ["api", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "asyncllm_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = FastCounter(
            "asyncllm_generation_tokens", "Tokens generated and delivered"
        )
        self.ttft = FastHistogram(
            "asyncllm_time_to_first_token_seconds",
            "From admission to the first generated token",
            _LATENCY_BUCKETS,
        )
        self.itl = FastHistogram(
            "asyncllm_inter_token_latency_seconds",
            "Time between generated tokens of one sequence",
            _ITL_BUCKETS,
        )
        r.register(_FastCollector([self.generation_tokens, self.ttft, self.itl]))
        self.open_sockets = Gauge("asyncllm_open_websockets", "Open WebSockets", registry=r)
        self.open_streams = Gauge(
            "asyncllm_open_streams", "Unfinished WebSocket streams (attached or not)", registry=r
        )
        self.sessions = Gauge("asyncllm_sessions", "WebSocket sessions alive", registry=r)
        self.running = Gauge("asyncllm_num_requests_running", "Running in the engine", registry=r)
        self.waiting = Gauge("asyncllm_num_requests_waiting", "Waiting in the engine", registry=r)
        self.kv_used = Gauge("asyncllm_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("asyncllm_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.engine_alive = Gauge(
            "asyncllm_engine_alive", "1 while the engine is healthy", registry=r
        )

    def render(self, alive: bool = True) -> bytes:
        """Refresh the engine gauges from one stats snapshot, then render the text format."""
        self.engine_alive.set(1 if alive else 0)
        if not alive:
            # A dead engine runs nothing and holds no blocks; its last snapshot is history.
            for g in (self.running, self.waiting, self.kv_used):
                g.set(0)
        elif self._stats is not None:
            try:
                s = self._stats()
            except Exception:  # a dead engine must not break /metrics
                s = None
            if s is not None:
                self.running.set(s.num_running)
                self.waiting.set(s.num_waiting)
                self.kv_total.set(s.kv_blocks_total)
                self.kv_used.set(s.kv_blocks_total - s.kv_blocks_free)
        return generate_latest(self.registry)
