"""Result records: every figure of a run plus where it ran, written as JSON under results/."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from asyncllm import envs

# In a source checkout results are committed beside the notes (ops/bench/results); from an
# installed package they go to the working directory.
_CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "ops" / "bench" / "results"
RESULTS_DIR = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else Path.cwd() / "bench-results"
# The H100 this project targets, as measured on the lent machine (see NOTES.md).
H100_COPY_BW = 3.0e12  # bytes/s, device-to-device copy counting reads and writes
H100_BF16_FLOPS = 780e12


def measure_copy_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """Device-to-device copy rate of this GPU in bytes/s, counting bytes read plus written (the
    roofline's bandwidth), as the median of `reps` timed copies of a `gib` GiB random buffer."""
    import statistics

    import torch

    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:  # warm-up
            times.append(a.elapsed_time(b) / 1e3)
    bw = 2 * src.numel() * src.element_size() / statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted changes); ASYNCLLM_COMMIT where the tree has no .git
    (the lent GPU machine gets a copy of the working tree only)."""
    if envs.commit():
        return envs.commit()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu_name"] = p.name
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["gpu_sms"] = p.multi_processor_count
        env["cuda"] = torch.version.cuda
    return env


def gpu_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    m = re.search(r"\b([ahlbv]\d{2,3}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def record(
    benchmark: str,
    value: float,
    unit: str,
    baseline: str | None,
    baseline_value: float | None,
    roofline_value: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """One result object with the issue's required fields. Ratios are 'how many times better
    than': for tok/s value/other, for ms/token other/value."""
    higher_better = unit.endswith("/s")

    def ratio(other: float | None) -> float | None:
        if not other or not value:
            return None
        return round(value / other if higher_better else other / value, 4)

    env = environment()
    return {
        "benchmark": benchmark,
        "gpu": env.get("gpu_name", "none (CPU)"),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "value": round(value, 4),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 4),
        "ratio_to_baseline": ratio(baseline_value),
        "roofline_value": None if roofline_value is None else round(roofline_value, 4),
        # fraction of the roofline reached (1.0 = at the hardware limit)
        "ratio_to_roofline": None
        if roofline_value is None
        else round(value / roofline_value if higher_better else roofline_value / value, 4),
        "environment": env,
        **extra,
    }


def write(records: list[dict[str, Any]] | dict[str, Any], benchmark: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.date.today().isoformat()
    name = (
        f"{benchmark}-{date}.json"
        if benchmark == "cpu"
        else f"{benchmark}-{gpu_slug()}-{date}.json"
    )
    path = out_dir / name
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def throughput_roofline(
    prompt_lens: list[int],
    output_lens: list[int],
    weight_bytes: int,
    kv_bytes_per_token: int,
    bandwidth: float = H100_COPY_BW,
) -> dict[str, float]:
    """Output tok/s if every decode step only read the weights once and each running sequence's
    KV once, at `bandwidth`, all sequences decoding together (prefill not counted, as the issue's
    roofline). The first output token of each request comes from its prefill."""
    steps = max(output_lens) - 1
    kv_token_reads = sum(
        sum(range(p + 1, p + o)) for p, o in zip(prompt_lens, output_lens, strict=True)
    )
    weight_time = steps * weight_bytes / bandwidth
    kv_time = kv_token_reads * kv_bytes_per_token / bandwidth
    total = weight_time + kv_time
    return {
        "tok_per_s": sum(output_lens) / total,
        "weight_read_s": weight_time,
        "kv_read_s": kv_time,
    }
