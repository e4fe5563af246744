"""The gateway's lock-free per-token metrics render exactly as prometheus_client's own would."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from asyncllm.gateway.metrics import _ITL_BUCKETS, _LATENCY_BUCKETS, Metrics


def _lines(text: bytes, names: tuple[str, ...]) -> list[str]:
    out = [re.sub(r"_created \S+", "_created T", ln) for ln in text.decode().splitlines()]
    return sorted(ln for ln in out if any(n in ln for n in names))


def test_fast_metrics_match_prometheus_client():
    m = Metrics()
    reg = CollectorRegistry()
    itl = Histogram(
        "asyncllm_inter_token_latency_seconds",
        "Time between generated tokens of one sequence",
        buckets=_ITL_BUCKETS,
        registry=reg,
    )
    ttft = Histogram(
        "asyncllm_time_to_first_token_seconds",
        "From admission to the first generated token",
        buckets=_LATENCY_BUCKETS,
        registry=reg,
    )
    gen = Counter("asyncllm_generation_tokens", "Tokens generated and delivered", registry=reg)
    rng = random.Random(0)
    # Bucket bounds themselves (le is inclusive), values past the last bound, and multi-token
    # outputs observed at once.
    values = [*_ITL_BUCKETS, 0.0, 5.0, *(rng.expovariate(50) for _ in range(200))]
    for v in values:
        n = rng.choice([1, 1, 1, 3])
        m.itl.observe(v, n)
        for _ in range(n):
            itl.observe(v)
        m.ttft.observe(v * 10)
        ttft.observe(v * 10)
        m.generation_tokens.inc(n)
        gen.inc(n)
    names = ("asyncllm_inter_token", "asyncllm_time_to_first", "asyncllm_generation_tokens")
    ours, ref = _lines(m.render(), names), _lines(generate_latest(reg), names)
    # Sums agree to rounding (v * n is added once, not v n times); everything else exactly.
    assert [ln for ln in ours if "_sum " not in ln] == [ln for ln in ref if "_sum " not in ln]
    sums = [(a, b) for a, b in zip(ours, ref, strict=True) if "_sum " in a]
    assert len(sums) == 2
    for a, b in sums:
        assert a.split()[0] == b.split()[0]
        assert abs(float(a.split()[1]) - float(b.split()[1])) < 1e-9
