"""`python -m asyncllm.bench quant [--smoke]`: the Llama-3-8B shape (hidden 4096, intermediate 14336,
32 layers, 32 heads / 8 KV heads, vocabulary 128256, untied head) in bf16, fp8 (per-channel
weights, W8A8 with per-token activation scales: `quantization="fp8"` at load) and GPTQ int4
(group 128, symmetric: the Triton W4A16 kernel), on nano-vllm's workload (asyncllm/bench/peer.py's
`anchor_workload`, temperature 0.6, detokenized) and 1-stream latency (peer_run's measurement).

Weights are random and drawn on the device as the loader asks for them (nothing written but
config.json and a tokenizer): bf16 N(0, 0.02); GPTQ words uniformly random with zero 8 and
scales giving the same spread. Each format runs in a process of its own. The roofline counts
the bytes a decode step reads: every linear weight at its stored width plus its scales and zero
points, the bf16 head and norms. Records `quant_throughput` / `quant_latency` (with `format`)
go to results/quant-<gpu>-<date>.json. `--smoke`: a tiny shape on the CPU (float32)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from asyncllm import envs
from asyncllm.bench import model, results
from asyncllm.bench.peer import anchor_workload

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
)
SMOKE = dict(
    LLAMA3_8B,
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    bos_token_id=0,
    eos_token_id=1,
)
FORMATS = ("bf16", "fp8", "gptq-int4")
GPTQ_GROUP = 128
INIT_STD = 0.02
MAX_MODEL_LEN = 4096


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(out, in) of one layer's projections."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return [(hq * d, h), (hkv * d, h), (hkv * d, h), (h, hq * d), (i, h), (i, h), (h, i)]


def decode_bytes(cfg: dict, fmt: str) -> int:
    """Bytes of weights one decode step reads in `fmt` (what the kernels actually load)."""
    per_layer = 0
    for n, k in linear_shapes(cfg):
        if fmt == "bf16":
            per_layer += 2 * n * k
        elif fmt == "fp8":
            per_layer += n * k + 4 * n  # e4m3 + a float32 scale per output
        else:
            groups = k // GPTQ_GROUP
            per_layer += n * k // 2 + groups * n * (2 + 1)  # int4 + fp16 scale + uint8 zero
    h = cfg["hidden_size"]
    norms = 2 * h * 2
    head = 2 * cfg["vocab_size"] * h
    return cfg["num_hidden_layers"] * (per_layer + norms) + head + 2 * h


def write_model_dir(out: Path, cfg: dict, fmt: str) -> Path:
    """config.json (+ the GPTQ quantization_config) and a word-level tokenizer; no weights."""
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    conf = LlamaConfig(**cfg)
    conf.architectures = ["LlamaForCausalLM"]
    data = conf.to_dict()
    if fmt == "gptq-int4":
        data["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GPTQ_GROUP,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        }
    (out / "config.json").write_text(json.dumps(data, indent=1))
    if not (out / "tokenizer.json").exists():
        model._tokenizer(out, cfg["vocab_size"], cfg["eos_token_id"])
    return out


def smoke_workload(vocab: int) -> dict[str, Any]:
    wl = anchor_workload(vocab, n=8)
    wl["requests"] = [(p[:24], 6) for p, _ in wl["requests"]]
    wl["latency_prompts"] = [p[:16] for p in wl["latency_prompts"]]
    wl["latency_output_len"] = 6
    wl["max_model_len"] = 256
    return wl


def _run_format(fmt: str, mdir: Path, wl_path: Path, args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, "-m", "asyncllm.bench.quant_run", fmt, str(mdir), str(wl_path),
           "--what", args.what]  # fmt: skip
    print(f"--- {fmt}: {' '.join(cmd)}", flush=True)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"{fmt} ran past {args.timeout} s; keeping what it reported", flush=True)
        return [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    sys.stdout.write(proc.stdout[-3000:])
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode:
        print(f"{fmt} exited with code {proc.returncode}", flush=True)
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench quant")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (float32)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--what", default="throughput,latency")
    p.add_argument("--num-requests", type=int, default=256)
    # 3 x 150 s plus the bandwidth probe stays inside the benchmark's 8 minutes on one GPU
    p.add_argument("--timeout", type=int, default=150, help="seconds per format")
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else LLAMA3_8B
    root = envs.bench_dir() / ("quant-smoke" if args.smoke else "quant-llama3-8b")
    if args.smoke:
        wl = smoke_workload(cfg["vocab_size"])
        bw = 50e9  # a nominal CPU figure: the smoke run checks the plumbing, not the speed
    else:
        wl = anchor_workload(cfg["vocab_size"], n=args.num_requests)
        wl["max_model_len"] = MAX_MODEL_LEN
        bw = results.measure_copy_bandwidth()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(wl, f)
        wl_path = Path(f.name)
    prompt_lens = [len(q) for q, _ in wl["requests"]]
    out_lens = [o for _, o in wl["requests"]]
    kv = model.kv_bytes_per_token(cfg, 4 if args.smoke else 2)
    recs: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            raise SystemExit(f"unknown format {fmt!r}; choose from {FORMATS}")
        mdir = write_model_dir(root / ("gptq" if fmt == "gptq-int4" else "float"), cfg, fmt)
        wbytes = decode_bytes(cfg, fmt) * (2 if args.smoke else 1)  # smoke: float32 everywhere
        roof = results.throughput_roofline(prompt_lens, out_lens, wbytes, kv, bandwidth=bw)
        for r in _run_format(fmt, mdir, wl_path, args):
            kind = r["kind"]
            key, unit = (
                ("tok_per_s", "tok/s") if kind == "throughput" else ("ms_per_token", "ms/token")
            )
            roof_value = roof["tok_per_s"] if kind == "throughput" else wbytes / bw * 1e3
            if fmt == "bf16":
                base[kind] = r[key]
            rec = results.record(
                f"quant_{kind}", r[key], unit, "bf16" if fmt != "bf16" else None,
                base.get(kind) if fmt != "bf16" else None, roof_value,
                format=fmt,
                shape="llama-3-8b" if not args.smoke else "smoke",
                workload=(
                    f"nano-vllm's bench: {len(wl['requests'])} requests, prompt/output "
                    "U[100,1024], random ids, temperature 0.6, EOS ignored, detokenized"
                    if kind == "throughput" else
                    "1 stream, 256 prompt / 256 output tokens, temperature 0.6, detokenized; "
                    "median of 3 runs after a warm-up"
                ),
                decode_weight_bytes=wbytes,
                copy_bandwidth_bytes_per_s=bw,
                roofline=roof if kind == "throughput" else {"basis": "weights read once per token"},
                detail=r,
            )  # fmt: skip
            recs.append(rec)
            print(f"{fmt} {kind}: {r[key]:.2f} {unit}, share of roofline "
                  f"{rec['ratio_to_roofline']}, vs bf16 {rec['ratio_to_baseline']}", flush=True)  # fmt: skip
    wl_path.unlink()
    path = results.write(recs, "quant-smoke" if args.smoke else "quant", Path(args.out))
    print(f"wrote {path}")
    expected = len(args.formats.split(",")) * len(args.what.split(","))
    return 0 if len(recs) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
