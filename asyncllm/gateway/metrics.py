"""Prometheus metrics for one app. Each app owns its CollectorRegistry, so tests (and programs)
can build many apps in one process without "duplicated timeseries" errors.

The per-token metrics (generated tokens, inter-token latency) are plain counters updated on the
event loop and read by a collector at scrape time: prometheus_client's own metrics take a lock and
check their state on every update, several microseconds each, and on a GPU every microsecond the
loop spends per token is taken from the engine thread (they share the GIL).

The metrics vLLM users chart are exported a second time under vLLM's names (`vllm:...`, with a
`model_name` label, from the same counts), so dashboards built for vLLM work unchanged."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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

    def labelled(self, name: str, documentation: str, labels: dict[str, str]) -> Any:
        fam = CounterMetricFamily(name, documentation, labels=list(labels))
        fam.add_metric(list(labels.values()), self.value, created=self.created)
        return fam


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

    def _cumulative(self) -> list[tuple[str, float]]:
        cum: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            acc += n
            cum.append((bound, acc))
        return cum

    def family(self) -> HistogramMetricFamily:
        cum = self._cumulative()
        fam = HistogramMetricFamily(self.name, self.documentation, buckets=cum, sum_value=self.sum)
        fam.add_sample(self.name + "_created", {}, self.created)  # as prometheus_client's own
        return fam

    def labelled(self, name: str, documentation: str, labels: dict[str, str]) -> Any:
        fam = HistogramMetricFamily(name, documentation, labels=list(labels))
        fam.add_metric(list(labels.values()), self._cumulative(), sum_value=self.sum)
        return fam


class _FastCollector(Collector):
    def __init__(self, metrics: list[FastCounter | FastHistogram]):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for m in self.metrics:
            yield m.family()


class _EngineCollector(Collector):
    """Per-engine series of a data-parallel group, read at scrape time from `engine_states()`
    (data_parallel.EngineState); no samples (only the families) without a group."""

    def __init__(self, states: Callable[[], Sequence[Any]] | None):
        self.states = states

    def collect(self) -> Iterator[Any]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["engine"])

        alive = gauge("asyncllm_dp_engine_alive", "1 while this data-parallel engine is alive")
        flight = gauge("asyncllm_dp_requests_in_flight", "Requests routed to it, unfinished")
        running = gauge("asyncllm_dp_num_requests_running", "Running in this engine")
        waiting = gauge("asyncllm_dp_num_requests_waiting", "Waiting in this engine")
        used = gauge("asyncllm_dp_kv_blocks_used", "KV cache blocks in use in this engine")
        total = gauge("asyncllm_dp_kv_blocks_total", "KV cache blocks of this engine")
        routed = CounterMetricFamily(
            "asyncllm_dp_requests_routed", "Requests routed to this engine", labels=["engine"]
        )
        prefix = CounterMetricFamily(
            "asyncllm_dp_prefix_routed",
            "Requests routed to this engine because it held their prefix",
            labels=["engine"],
        )
        try:
            states = list(self.states()) if self.states is not None else []
        except Exception:  # the group is not loaded yet: families without samples
            states = []
        for st in states:
            lab = [str(st.index)]
            alive.add_metric(lab, 1 if st.alive else 0)
            flight.add_metric(lab, st.in_flight)
            routed.add_metric(lab, st.routed)
            prefix.add_metric(lab, st.prefix_routed)
            s = st.stats
            if s is not None:
                running.add_metric(lab, s.num_running)
                waiting.add_metric(lab, s.num_waiting)
                used.add_metric(lab, s.kv_blocks_total - s.kv_blocks_free)
                total.add_metric(lab, s.kv_blocks_total)
        yield from (alive, flight, running, waiting, used, total, routed, prefix)


class _VllmCollector(Collector):
    """The same counts under vLLM's metric names (vllm/v1/metrics/loggers.py), per model_name.
    vLLM's `*_perc` gauges are fractions (0-1); time_per_output_token_seconds is the older name
    of inter_token_latency_seconds, both exported."""

    def __init__(self, m: Metrics):
        self.m = m

    def collect(self) -> Iterator[Any]:
        m = self.m
        try:
            labels = {"model_name": m.model_name()}
        except Exception:  # no model loaded yet
            labels = {"model_name": ""}
        names = list(labels)
        values = list(labels.values())
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests running in the engine", m.running_now),
            ("vllm:num_requests_waiting", "Requests waiting in the engine", m.waiting_now),
            ("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", m.kv_usage_now),
            ("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full); older name", m.kv_usage_now),
        ):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            yield g
        yield m.prompt_tokens.labelled("vllm:prompt_tokens", "Prompt tokens", labels)
        yield m.generation_tokens.labelled("vllm:generation_tokens", "Generation tokens", labels)
        yield m.ttft.labelled(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds", labels
        )
        yield m.itl.labelled(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds", labels
        )
        yield m.itl.labelled(
            "vllm:time_per_output_token_seconds", "Time per output token in seconds", labels
        )
        yield m.e2e.labelled(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds", labels
        )


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        stats: Callable[[], Any] | None = None,
        engine_states: Callable[[], Sequence[Any]] | None = None,
        model_name: Callable[[], str] | None = None,
    ):
        """`stats`: the engine's stats snapshot. `engine_states`: a data-parallel group's
        per-engine states (DataParallelEngine.engine_states), for the asyncllm_dp_* series."""
        self.registry = CollectorRegistry()
        self._stats = stats
        self.model_name: Callable[[], str] = model_name or (lambda: "")
        # the engine's stats at the last scrape (render), for both sets of names
        self.running_now = self.waiting_now = self.kv_usage_now = 0.0
        r = self.registry
        r.register(_EngineCollector(engine_states))
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
        self.prompt_tokens = FastCounter(
            "asyncllm_prompt_tokens", "Prompt tokens of admitted requests"
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
        self.e2e = FastHistogram(
            "asyncllm_e2e_request_latency_seconds",
            "From admission to the last token of finished requests",
            _LATENCY_BUCKETS,
        )
        r.register(
            _FastCollector(
                [self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e]
            )
        )
        r.register(_VllmCollector(self))
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
        # Steps against tokens says how full the batches were (the serving benchmark reads it).
        self.engine_steps = Gauge(
            "asyncllm_engine_steps", "Engine steps run since the engine started", registry=r
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
                used = s.kv_blocks_total - s.kv_blocks_free
                self.running.set(s.num_running)
                self.waiting.set(s.num_waiting)
                self.kv_total.set(s.kv_blocks_total)
                self.kv_used.set(used)
                self.engine_steps.set(getattr(s, "num_steps", 0))
                self.running_now, self.waiting_now = s.num_running, s.num_waiting
                self.kv_usage_now = used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        return generate_latest(self.registry)
