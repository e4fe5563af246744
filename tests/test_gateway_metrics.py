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


def _scrape(srv, **kw) -> dict[str, dict[tuple, float]]:
    """name -> {labels (sorted items): value} of every sample on /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(srv.http + "/metrics", **kw)
    assert r.status_code == 200, r.text
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_vllm_names_carry_the_same_counts():
    from asyncllm.gateway import GatewaySettings
    from tests.gateway_helpers import WS, FakeEngine, run_server

    with run_server(FakeEngine(step_s=0.001), GatewaySettings()) as srv:
        ws = WS(srv.ws_url())
        for i in range(3):
            ws.send({"type": "complete", "id": i, "prompt": "hello", "params": {"max_tokens": 7}})
        ws.until_done(range(3))
        ws.close()
        m = _scrape(srv)
    model = (("model_name", "fake-model"),)
    one = lambda name: m[name][()]  # noqa: E731
    assert m["vllm:generation_tokens_total"][model] == one("asyncllm_generation_tokens_total") == 21
    assert m["vllm:prompt_tokens_total"][model] == one("asyncllm_prompt_tokens_total") == 15
    for ours, theirs in (
        ("asyncllm_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
        ("asyncllm_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"),
        ("asyncllm_inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        ("asyncllm_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
    ):
        assert m[theirs + "_count"][model] == one(ours + "_count") > 0, theirs
        assert m[theirs + "_sum"][model] == one(ours + "_sum")
        assert m[theirs + "_bucket"][(("le", "+Inf"), *model)] == one(ours + "_count")
    assert one("asyncllm_e2e_request_latency_seconds_count") == 3  # one per finished request
    # the fake engine reports 100 KV blocks, all free once idle; nothing running or waiting
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert m[name][model] == 0
    assert m["vllm:kv_cache_usage_perc"][model] == m["vllm:gpu_cache_usage_perc"][model] == 0


def test_kv_usage_is_a_fraction():
    from types import SimpleNamespace

    m = Metrics(
        stats=lambda: SimpleNamespace(
            num_running=3, num_waiting=2, kv_blocks_total=200, kv_blocks_free=150
        ),
        model_name=lambda: "m",
    )
    text = m.render().decode()
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.25' in text
    assert 'vllm:gpu_cache_usage_perc{model_name="m"} 0.25' in text
    assert 'vllm:num_requests_running{model_name="m"} 3.0' in text
    assert 'vllm:num_requests_waiting{model_name="m"} 2.0' in text
    assert "asyncllm_kv_blocks_used 50.0" in text


def test_engine_steps_gauge_follows_the_stats():
    """The serving benchmark reads steps per run from it (steps vs tokens: how full batches were)."""
    from types import SimpleNamespace

    steps = [7]
    m = Metrics(
        stats=lambda: SimpleNamespace(
            num_running=0, num_waiting=0, kv_blocks_total=10, kv_blocks_free=10, num_steps=steps[0]
        ),
        model_name=lambda: "m",
    )
    assert "asyncllm_engine_steps 7.0" in m.render().decode()
    steps[0] = 1030
    assert "asyncllm_engine_steps 1030.0" in m.render().decode()


def test_metrics_public_lets_a_scraper_in_without_the_key():
    import httpx

    from asyncllm.gateway import GatewaySettings
    from tests.gateway_helpers import FakeEngine, run_server

    with run_server(FakeEngine(), GatewaySettings(api_keys=("k",))) as srv:
        assert httpx.get(srv.http + "/metrics").status_code == 401
        _scrape(srv, headers={"Authorization": "Bearer k"})
    with run_server(FakeEngine(), GatewaySettings(api_keys=("k",), metrics_public=True)) as srv:
        assert "vllm:num_requests_running" in _scrape(srv)
        assert httpx.get(srv.http + "/v1/models").status_code == 401  # the rest keeps its key


def test_models_reports_when_the_model_was_loaded():
    import time

    import httpx

    from asyncllm.gateway import GatewaySettings
    from tests.gateway_helpers import FakeEngine, run_server

    t0 = int(time.time())
    with run_server(FakeEngine(), GatewaySettings()) as srv:
        (card,) = httpx.get(srv.http + "/v1/models").json()["data"]
    assert t0 <= card["created"] <= int(time.time()), card
