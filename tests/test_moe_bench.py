"""asyncllm/bench/moe.py: the roofline arithmetic, and the whole benchmark in its CPU smoke mode."""

from __future__ import annotations

import json

import pytest

from asyncllm.bench import moe, workloads


def test_expected_experts_hit():
    assert moe.expected_experts_hit(0, 128, 8) == 0
    assert moe.expected_experts_hit(1, 128, 8) == pytest.approx(8)
    hits = [moe.expected_experts_hit(b, 128, 8) for b in (1, 4, 16, 64, 256)]
    assert hits == sorted(hits) and hits[-1] == pytest.approx(128, abs=0.01)
    assert moe.expected_experts_hit(16, 128, 8) == pytest.approx(128 * (1 - (120 / 128) ** 16))


def test_roofline_counts_experts_actually_hit():
    shape = moe.QWEN3_30B_A3B
    one = moe.step_weight_bytes(shape, 1)
    full = moe.step_weight_bytes(shape, 10_000)
    # all experts: 48 layers x 128 x 3 x 2048 x 768 bf16 = 57.98 GB, + ~1.9 GB dense
    assert full == pytest.approx(57.98e9 + moe.dense_weight_bytes(shape), rel=1e-3)
    assert one == pytest.approx(moe.dense_weight_bytes(shape) + 48 * 8 * moe.expert_bytes(shape))
    roof = moe.throughput_roofline([100, 100], [3, 5], shape, bandwidth=1e12)
    # steps 1-2 have both sequences, 3-4 one
    want = 2 * moe.step_weight_bytes(shape, 2) + 2 * moe.step_weight_bytes(shape, 1)
    assert roof["weight_read_s"] == pytest.approx(want / 1e12)
    assert roof["decode_steps"] == 4


def test_smoke_run_writes_both_records(tmp_path):
    from asyncllm.bench.__main__ import main

    assert main(["moe", "--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("moe-*.json")
    recs = {r["benchmark"]: r for r in json.loads(path.read_text())}
    assert set(recs) == {"moe_throughput", "moe_latency"}
    for r in recs.values():
        assert r["shape"] == "tiny-smoke" and r["temperature"] == 0.6 and r["detokenize"]
        assert r["value"] > 0 and r["ratio_to_roofline"] > 0
        for key in ("gpu", "commit", "unit"):
            assert r[key]
    want = sum(r.max_tokens for r in workloads.throughput_workload(n=8, lo=4, hi=16, vocab=512))
    assert recs["moe_throughput"]["asyncllm"]["output_tokens"] == want
