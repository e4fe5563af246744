"""asyncllm/bench/peer.py: the anchor's workload as nano-vllm's bench.py draws it, and the asyncllm
side of a run on the CPU with a tiny model (the GPU run itself is on the lent H200)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from asyncllm.bench import peer
from tests.tiny_models import build_model


def test_anchor_workload_is_nano_vllms_draw():
    wl = peer.anchor_workload(1000, n=5)
    rng = random.Random(12345)  # bench.py's own lines, verbatim in effect
    want = [
        ([rng.randrange(700) for _ in range(rng.randint(100, 1024))], rng.randint(100, 1024))
        for _ in range(5)
    ]
    assert [tuple(r) for r in wl["requests"]] == want
    assert len(wl["latency_prompts"]) == 4 and all(len(p) == 256 for p in wl["latency_prompts"])
    assert wl["latency_prompts"][0] != wl["latency_prompts"][1]  # no prefix-cache hits


def test_asyncllm_side_runs_and_detokenizes(tmp_path):
    mdir = build_model("llama", tmp_path / "m")
    wl = {
        "requests": [[[5 + i, 6, 7, 8], 3 + i] for i in range(9)],
        "latency_prompts": [[9, 10, 11]] * 2,
        "latency_output_len": 4,
        "max_model_len": 64,
    }
    wl_path = tmp_path / "wl.json"
    wl_path.write_text(json.dumps(wl))
    proc = subprocess.run(
        [sys.executable, "-m", "asyncllm.bench.peer_run", "asyncllm", str(mdir), str(wl_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {
        r["kind"]: r
        for r in (json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    }
    assert got["throughput"]["output_tokens"] == sum(3 + i for i in range(9))
    assert got["throughput"]["tok_per_s"] > 0
    assert len(got["latency"]["runs_ms_per_token"]) == 1
