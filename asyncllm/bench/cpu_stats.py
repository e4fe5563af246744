"""Statistics of the repeated `cpu` benchmark (asyncllm/bench/cpu.py): the interleaved round order,
each engine's median and spread (min-max) over its rounds, and verdicts that are stated only when
the spreads do not overlap. Plain Python (no torch), so tests/test_cpu_bench.py runs it fast.

Why min-max and not a confidence interval: with 3-5 rounds on a shared 2-core VM whose runs differ
by ~10% (ops/bench/NOTES.md), a distributional model would be a guess; "every round of A beat
every round of B" is a claim the numbers themselves show."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

# a verdict needs at least this many rounds on each side: the issue asks for >= 3, and two points
# whose ranges happen not to overlap say little on this VM
MIN_ROUNDS_FOR_VERDICT = 3


def schedule(engines: list[str], rounds: int) -> list[tuple[int, str]]:
    """The run order: round r runs every engine once, in the order given (ABAB..., not AABB), so
    a drift of the machine's load over the run reaches every engine alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(set(engines)) != len(engines):
        raise ValueError(f"engines repeat: {engines}")
    return [(r, e) for r in range(rounds) for e in engines]


@dataclass
class Spread:
    """One engine's figure over its rounds."""

    n: int
    median: float
    min: float
    max: float
    values: list[float]

    @property
    def relative_spread(self) -> float:
        """(max - min) / median: how noisy this engine's rounds were."""
        return (self.max - self.min) / self.median if self.median else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_spread"] = round(self.relative_spread, 4)
        return d


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("no values: the engine produced no successful round")
    return Spread(len(values), statistics.median(values), min(values), max(values), list(values))


def overlap(a: Spread, b: Spread, factor: float = 1.0) -> bool:
    """Whether a's [min, max] and b's [min, max] scaled by `factor` share a point."""
    return a.min <= b.max * factor and b.min * factor <= a.max


def verdict(
    a_name: str,
    a: Spread,
    b_name: str,
    b: Spread,
    higher_better: bool,
    min_rounds: int = MIN_ROUNDS_FOR_VERDICT,
) -> dict[str, Any]:
    """a against b. The ratio of medians is always given ('how many times better', > 1 = a is
    better); the verdict 'faster'/'slower' only when every round of one beat every round of the
    other (the spreads do not overlap), else 'within noise'."""
    ratio = a.median / b.median if higher_better else b.median / a.median
    out: dict[str, Any] = {"a": a_name, "b": b_name, "ratio_of_medians": round(ratio, 4)}
    if min(a.n, b.n) < min_rounds:
        out["verdict"] = f"too few rounds ({min(a.n, b.n)} < {min_rounds}): no verdict"
    elif overlap(a, b):
        out["verdict"] = "within noise"
    else:
        a_better = (a.min > b.max) if higher_better else (a.max < b.min)
        out["verdict"] = f"{a_name} {'faster' if a_better else 'slower'} than {b_name}"
    return out


def target(
    a_name: str,
    a: Spread,
    b_name: str,
    b: Spread,
    factor: float,
    higher_better: bool,
    min_rounds: int = MIN_ROUNDS_FOR_VERDICT,
) -> dict[str, Any]:
    """The issue's 'a >= factor x b' targets (throughput: a's tok/s >= factor x b's; latency: a's
    speed, 1/ms, >= factor x b's). 'met' only when a's worst round clears factor x b's best round,
    'not met' when a's best round stays under factor x b's worst, else 'within noise'."""
    # in 'speed' terms (higher = better) so one rule serves both directions
    if higher_better:
        lo_a, hi_a, lo_b, hi_b = a.min, a.max, b.min, b.max
    else:
        lo_a, hi_a, lo_b, hi_b = 1 / a.max, 1 / a.min, 1 / b.max, 1 / b.min
    ratio = a.median / b.median if higher_better else b.median / a.median
    out: dict[str, Any] = {
        "target": f"{a_name} >= {factor}x {b_name}",
        "ratio_of_medians": round(ratio, 4),
    }
    if min(a.n, b.n) < min_rounds:
        out["status"] = f"too few rounds ({min(a.n, b.n)} < {min_rounds}): no verdict"
    elif lo_a >= factor * hi_b:
        out["status"] = "met"
    elif hi_a < factor * lo_b:
        out["status"] = "not met"
    else:
        out["status"] = "within noise"
    return out


def first_diff(a: list[int], b: list[int]) -> int | None:
    """The first output position where a and b differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far two engines' greedy continuations agree: prompts identical token for token, and
    for the others the output position of the first different token."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} against {len(b)} outputs")
    firsts = [first_diff(x, y) for x, y in zip(a, b, strict=True)]
    diverged = sorted(f for f in firsts if f is not None)
    same_prefix = sum(len(x) if f is None else f for x, f in zip(a, firsts, strict=True))
    total = sum(len(x) for x in a)
    return {
        "identical": len(a) - len(diverged),
        "of": len(a),
        "share_identical": round((len(a) - len(diverged)) / len(a), 4) if a else None,
        # tokens before the first difference, over all output tokens
        "share_tokens_before_first_difference": round(same_prefix / total, 4) if total else None,
        "first_difference_positions": diverged,
    }


def logprob_difference(
    ref_ids: list[list[int]],
    ref_lps: list[list[float]],
    ids: list[list[int]],
    lps: list[list[float]],
) -> dict[str, Any]:
    """|logprob difference| of the chosen token where two greedy runs still share their context:
    the output positions before their first different token (same prompt, same tokens so far, same
    chosen token), so the two logprobs are of the same event."""
    diffs: list[float] = []
    for ra, la, rb, lb in zip(ref_ids, ref_lps, ids, lps, strict=True):
        f = first_diff(ra, rb)
        n = min(len(ra), len(rb), len(la), len(lb)) if f is None else f
        diffs.extend(abs(x - y) for x, y in zip(la[:n], lb[:n], strict=True))
    if not diffs:
        return {"positions": 0, "mean_abs": None, "max_abs": None}
    return {
        "positions": len(diffs),
        "mean_abs": round(statistics.fmean(diffs), 6),
        "median_abs": round(statistics.median(diffs), 6),
        "max_abs": round(max(diffs), 6),
    }
