"""`python -m asyncllm.bench peer`: asyncllm against nano-vllm + FlashAttention-4 on the anchor's own
workload (nano-vllm's bench.py: random.Random(12345), 256 requests, prompt and output lengths
U[100,1024], random ids, temperature 0.6, EOS ignored, text detokenized), for the Qwen3-0.6B and
Qwen3-8B shapes with random bf16 weights, throughput and 1-stream latency, in one run.

Each engine runs in its own process (asyncllm/bench/peer_run.py) on the same model directory and the
same requests. The peer needs nano-vllm and the FA4 shim on `--peer-path` (see
shared/peer_gpu/README.md for carrying FA4 to the lent GPU). Writes records
`peer_throughput` / `peer_latency` to results/peer-<gpu>-<date>.json."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from asyncllm import envs
from asyncllm.bench import model, results

PEER = "nano-vllm+fa4"
MAX_MODEL_LEN = 4096


def anchor_workload(vocab: int, n: int = 256, seed: int = 12345) -> dict[str, Any]:
    """nano-vllm's bench.py workload, drawn in its order (prompt, then output length), plus four
    256-token latency prompts (one warm-up, three timed) from a generator of their own."""
    rng = random.Random(seed)
    top = vocab - 300  # clear of the special ids at the top of Qwen's vocabulary
    reqs = [
        ([rng.randrange(top) for _ in range(rng.randint(100, 1024))], rng.randint(100, 1024))
        for _ in range(n)
    ]
    lat = random.Random(seed + 1)
    return {
        "requests": reqs,
        "latency_prompts": [[lat.randrange(top) for _ in range(256)] for _ in range(4)],
        "latency_output_len": 256,
        "max_model_len": MAX_MODEL_LEN,
    }


def _run_engine(
    engine: str, mdir: Path, wl_path: Path, what: str, peer_path: str | None, timeout: int
) -> list[dict[str, Any]]:
    env = dict(os.environ)
    if engine == "nano-vllm":
        if not peer_path:
            return []
        env["PYTHONPATH"] = os.pathsep.join([peer_path, env.get("PYTHONPATH", "")]).strip(
            os.pathsep
        )
    cmd = [
        sys.executable,
        "-m",
        "asyncllm.bench.peer_run",
        engine,
        str(mdir),
        str(wl_path),
        "--what",
        what,
    ]
    print(f"--- {engine}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(proc.stdout[-3000:])
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode:
        print(f"{engine} exited with code {proc.returncode}", flush=True)
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def run_shape(shape: str, args: argparse.Namespace, bw: float) -> list[dict[str, Any]]:
    cfg = model.SHAPES[shape]
    mdir = model.build_model_dir(model.shape_dir(shape), shape=cfg)
    wl = anchor_workload(cfg["vocab_size"], n=args.num_requests)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(wl, f)
        wl_path = Path(f.name)
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for engine in ("asyncllm", "nano-vllm"):
        for r in _run_engine(engine, mdir, wl_path, args.what, args.peer_path, args.timeout):
            got[(r["engine"], r["kind"])] = r
    prompt_lens = [len(p) for p, _ in wl["requests"]]
    out_lens = [o for _, o in wl["requests"]]
    wbytes, kvbytes = model.weight_bytes(cfg), model.kv_bytes_per_token(cfg)
    roof = results.throughput_roofline(prompt_lens, out_lens, wbytes, kvbytes, bandwidth=bw)
    common = {
        "shape": shape,
        "temperature": 0.6,
        "detokenize": True,
        "peer": PEER,
        "model": f"{shape} shape, random bf16 weights (std {model.INIT_STD})",
        "copy_bandwidth_bytes_per_s": bw,
    }
    recs = []
    for kind, key, unit, roof_value in (
        ("throughput", "tok_per_s", "tok/s", roof["tok_per_s"]),
        ("latency", "ms_per_token", "ms/token", wbytes / bw * 1e3),
    ):
        ours, peer = got.get(("asyncllm", kind)), got.get((PEER, kind))
        if ours is None:
            continue
        rec = results.record(
            f"peer_{kind}",
            ours[key],
            unit,
            PEER if peer else None,
            peer[key] if peer else None,
            roof_value,
            workload=(
                f"nano-vllm's bench: {len(wl['requests'])} requests, prompt/output U[100,1024], "
                "random ids, temperature 0.6, EOS ignored, detokenized"
                if kind == "throughput"
                else "1 stream, 256 prompt / 256 output tokens, temperature 0.6, detokenized; "
                "median of 3 runs after a warm-up, each with its own prompt"
            ),
            asyncllm=ours,
            peer_detail=peer,
            roofline=roof if kind == "throughput" else {"basis": "weights read once per token"},
            **common,
        )
        rec["peer_value"] = rec["baseline_value"]
        rec["ratio_to_peer"] = rec["ratio_to_baseline"]
        recs.append(rec)
        print(
            f"{shape} {kind}: asyncllm {ours[key]:.2f} {unit}, "
            f"{PEER} {peer[key] if peer else float('nan'):.2f}, ratio to peer "
            f"{rec['ratio_to_peer']}, share of roofline {rec['ratio_to_roofline']}",
            flush=True,
        )
    wl_path.unlink()
    return recs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench peer", description=__doc__)
    p.add_argument("--shapes", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--what", default="throughput,latency")
    p.add_argument("--peer-path", default=envs.peer_path())
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--timeout", type=int, default=400, help="seconds per engine run")
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("peer needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = results.measure_copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    recs: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        recs += run_shape(shape, args, bw)
    tag = (
        "peer" if args.shapes == "qwen3-0.6b,qwen3-8b" else "peer-" + args.shapes.replace(",", "+")
    )
    path = results.write(recs, tag, Path(args.out))
    print(f"wrote {path}")
    return 0
