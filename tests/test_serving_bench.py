"""asyncllm/bench/serving.py: the load generator's pieces, and one small end-to-end run (tiny model on
the CPU: engine-direct, then `asyncllm serve` in a subprocess over WebSocket and OpenAI HTTP)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import pytest

from asyncllm.bench import serving


def test_poisson_arrivals_have_the_asked_rate():
    gaps = serving.arrival_gaps(4000, 50.0, seed=1)
    assert all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.06)
    # exponential: the standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert serving.arrival_gaps(5, math.inf, seed=1) == [0.0] * 5
    assert serving.arrival_gaps(3, 5.0, seed=7) == serving.arrival_gaps(3, 5.0, seed=7)
    with pytest.raises(ValueError):
        serving.arrival_gaps(3, 0.0, seed=0)


def test_drive_caps_concurrency_and_times_requests():
    in_flight = 0
    peak = 0

    async def fake(i: int, prompt: str, r: serving.RequestResult) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(3):
            await asyncio.sleep(0.01)
            r.chunks.append(serving.time.perf_counter())
        r.tokens, r.ok = 3, True
        in_flight -= 1

    async def boom(i: int, prompt: str, r: serving.RequestResult) -> None:
        if i == 1:
            raise ConnectionError("reset")
        r.ok = True

    prompts = serving.make_prompts(12, 5, seed=0)
    assert len(set(prompts)) == 12
    results, wall = asyncio.run(serving.drive(prompts, math.inf, 4, 0, fake))
    assert peak == 4
    assert wall >= 3 * 3 * 0.01  # 12 requests, 4 at a time, 30 ms each
    run = serving.summarize("engine", math.inf, 4, results, wall)
    assert run["completed"] == 12 and run["errors"] == 0 and run["output_tokens"] == 36
    assert 8 <= run["itl_ms"]["p50"] < 100
    assert run["ttft_ms"]["p50"] <= run["ttft_ms"]["p90"] <= run["ttft_ms"]["p99"]
    results, wall = asyncio.run(serving.drive(prompts[:3], math.inf, 2, 0, boom))
    run = serving.summarize("ws", math.inf, 2, results, wall)
    assert run["errors"] == 1 and run["error_samples"] == ["ConnectionError: reset"]


def test_percentiles_and_comparison():
    p = serving.percentiles([0.001 * k for k in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert serving.percentiles([])["p99"] is None

    def run(mode: str, tok_s: float, ttft99: float, itl99: float) -> dict:
        lat = {"mean": 0, "p50": 0, "p90": 0}
        return {
            "mode": mode,
            "rate": "inf",
            "concurrency": 256,
            "delivered_tok_s": tok_s,
            "ttft_ms": {**lat, "p99": ttft99},
            "itl_ms": {**lat, "p99": itl99},
            "tpot_ms": {**lat, "p99": itl99},
        }

    (c,) = serving.compare([run("engine", 1000, 50, 10), run("ws", 960, 53, 12)])
    assert c["tok_s_ratio"] == pytest.approx(0.96)
    assert c["added_ttft_p99_ms"] == pytest.approx(3) and c["added_itl_p99_ms"] == pytest.approx(2)
    t = serving.targets([c])
    assert t["tok_s_ratio_met"] and t["added_itl_p99_met"]
    (c,) = serving.compare([run("engine", 1000, 50, 10), run("ws", 900, 53, 16)])
    t = serving.targets([c])
    assert not t["tok_s_ratio_met"] and not t["added_itl_p99_met"]


def test_bad_arguments_are_refused(capsys):
    assert serving.main(["--modes", "engine,carrier-pigeon"]) == 2
    assert serving.main(["--concurrency", "0"]) == 2
    assert serving.main(["--output-len", "0"]) == 2
    assert "must be" in capsys.readouterr().err


def test_end_to_end_small_run(tiny_model_dir, tmp_path):
    out = tmp_path / "serving.json"
    n, output_len = 8, 6
    rc = serving.main(
        [
            "--model", tiny_model_dir, "--device", "cpu",
            "--num-requests", str(n), "--concurrency", "2,4", "--rates", "inf,200",
            "--output-len", str(output_len), "--prompt-words", "6", "--warmup", "2",
            "--streams-per-socket", "3", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model"] and res["hardware"]["cpu_count"] >= 1
    assert res["workload"]["output_len"] == output_len
    runs = res["runs"]
    assert {(r["mode"], r["rate"], r["concurrency"]) for r in runs} == {
        (m, rate, c)
        for m in ("engine", "engine-sink", "ws", "http")
        for rate in ("inf", 200.0)
        for c in (2, 4)
    }
    for r in runs:
        # every request delivered exactly output_len tokens, whichever way it went in
        assert (r["completed"], r["errors"]) == (n, 0), r
        assert r["output_tokens"] == n * output_len, r
        assert r["delivered_tok_s"] > 0
        for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
            q = r[metric]
            assert 0 < q["p50"] <= q["p90"] <= q["p99"], (r["mode"], metric, q)
        assert r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
    # (ws, http) x 2 rates x 2 concurrencies, against each engine-direct anchor
    assert len(res["comparison"]) == 16
    assert {c["anchor"] for c in res["comparison"]} == {"engine", "engine-sink"}
    for c in res["comparison"]:
        assert c["tok_s_ratio"] > 0
    assert res["targets"]["anchor"] == "engine"
    assert res["targets_vs_engine_sink"]["anchor"] == "engine-sink"
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
