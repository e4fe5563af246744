"""Prometheus metrics for one app. Each app owns its CollectorRegistry, so tests (and programs)
can build many apps in one process without "duplicated timeseries" errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


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
        self.generation_tokens = Counter(
            "asyncllm_generation_tokens", "Tokens generated and delivered", registry=r
        )
        self.ttft = Histogram(
            "asyncllm_time_to_first_token_seconds",
            "From admission to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "asyncllm_inter_token_latency_seconds",
            "Time between generated tokens of one sequence",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
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
        if self._stats is not None:
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
