"""`python -m asyncllm.bench quant --smoke`: the benchmark's plumbing on the CPU (tiny shape, random
weights drawn by the replaced checkpoint reader, one process per format) writes its records."""

from __future__ import annotations

import json

from asyncllm.bench import quant


def test_decode_bytes_count_stored_widths():
    cfg = quant.LLAMA3_8B
    bf16, fp8, int4 = (quant.decode_bytes(cfg, f) for f in quant.FORMATS)
    head = 2 * cfg["vocab_size"] * cfg["hidden_size"]
    # Llama-3-8B: 8.03 B parameters in bf16, less the embedding (a lookup reads a few rows)
    assert 14.9e9 < bf16 < 15.1e9
    assert abs((fp8 - head) / (bf16 - head) - 0.5) < 0.01
    assert 0.26 < (int4 - head) / (bf16 - head) < 0.27  # 4 bits + fp16 scale + zero per 128


def test_smoke_run_writes_records(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCLLM_BENCH_DIR", str(tmp_path / "models"))
    rc = quant.main(["--smoke", "--formats", "bf16,gptq-int4", "--what", "latency",
                     "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    (path,) = tmp_path.glob("quant-smoke-*.json")
    recs = json.loads(path.read_text())
    assert [(r["benchmark"], r["format"]) for r in recs] == [
        ("quant_latency", "bf16"),
        ("quant_latency", "gptq-int4"),
    ]
    assert all(r["value"] > 0 and r["ratio_to_roofline"] is not None for r in recs)
    assert recs[1]["baseline"] == "bf16" and recs[1]["ratio_to_baseline"] is not None
