"""`python -m asyncllm.bench.attn_ab`: the attention kernels of issue 17 side by side, in one run.

1. Decode kernel, inside a CUDA graph cycling through layers' caches (so L2 does not serve the
   KV): triton-v1 (the first round's equal cut per sequence, the anchor), triton v2 (the
   balanced plan) and FlashAttention-4 where flash_attn.cute imports, at batch 1/64/256 and
   contexts 512 / 2048 / U[100,2048], Qwen3-0.6B heads (16 q / 8 kv) and Qwen3-8B heads (32 / 8),
   head_dim 128, block 16. Reports us per layer, GB/s of KV read and the share of the copy
   bandwidth measured in the same process; ratio to v1.
2. Prefill kernel: triton against FA4, 8 x 1024 fresh tokens and 2 x 512 after a 3000 prefix.
3. The engine on the peer's terms (asyncllm/bench/peer_run.py: nano-vllm's workload, 256
   requests, temperature 0.6, detokenized, Qwen3-0.6B shape) once per kernel choice, each in its
   own process with ASYNCLLM_DECODE_ATTENTION / ASYNCLLM_PREFILL_ATTENTION set; ratio to v1.

Writes one JSON (`--json`); prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

D, BS = 128, 16
HEADS = {"qwen3-0.6b": (16, 8), "qwen3-8b": (32, 8)}
CONTEXTS = {"512": (512, 512), "2048": (2048, 2048), "U[100,2048]": (100, 2048)}
# Tile / warp sweep of v2. Triton 3.9's sm90 build of the default (BLOCK_N 64, 4 warps, 3 stages):
# 96 registers, K/V through cp.async; BLOCK_N 32: 72; 8 warps: 80 (tests/test_decode_kernel_build)
SWEEP = [
    "triton-v2[bn=32,w=4]",
    "triton-v2[bn=64,w=8]",
    "triton-v2[bn=32,w=2]",
    "triton-v2[bn=128,w=8]",
    "triton-v2[t=528]",  # 4 work items per SM (the default: 8)
    "triton-v2[t=2112]",  # 16
]
ENGINE_VARIANTS = {
    # name: (ASYNCLLM_DECODE_ATTENTION, ASYNCLLM_PREFILL_ATTENTION)
    "triton-v1": ("triton-v1", "triton"),
    "triton-v2": ("triton", "triton"),
    "fa4": ("fa4", "fa4"),
    "v2+fa4-prefill": ("triton", "fa4"),
}


def _paged(lens: list[int], hkv: int, layers: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    blocks = [-(-n // BS) for n in lens]
    nb = sum(blocks) + 1
    perm = torch.randperm(nb).tolist()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[used : used + n])
        used += n
    caches = [
        torch.randn(2, nb, BS, hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)
    ]
    return caches, tables.cuda()


def _decode_fn(variant: str):
    from asyncllm.engine.kernels import fa4_attention
    from asyncllm.engine.kernels.decode_attention import paged_decode_attention

    if variant == "fa4":  # FA4 allocates its output (no copy into ours: a kernel of its own)
        return lambda q, c, t, s, out: fa4_attention.decode(q, c, t, s, D**-0.5)
    balanced = variant.startswith("triton-v2")
    kw: dict[str, int] = {}
    if "[" in variant:  # the sweep: "triton-v2[bn=32,w=4]"
        for item in variant[variant.index("[") + 1 : -1].split(","):
            name, value = item.split("=")
            keys = {"bn": "block_n", "w": "num_warps", "st": "num_stages", "t": "target"}
            kw[keys[name]] = int(value)
    return lambda q, c, t, s, out: paged_decode_attention(
        q, c, t, s, D**-0.5, out=out, balanced=balanced, **kw
    )


def bench_decode(
    shape: str, batch: int, ctx: str, variants: list[str], bw: float, refs: dict[tuple, Any]
) -> list[dict]:
    """One case, each variant timed; `refs` keeps v1's output and time per case (CPU), so FA4,
    run in a pass of its own after every Triton row (a crash of it cannot cost those), compares
    against the same inputs (seeded)."""
    from triton.testing import do_bench

    hq, hkv = HEADS[shape]
    lo, hi = CONTEXTS[ctx]
    seed = batch * 7 + hi
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [rng.randint(lo, hi) for _ in range(batch)]
    nbytes = sum(lens) * hkv * D * 2 * 2
    layers = max(2, min(28, int(8e9 // (nbytes + 1))))
    caches, tables = _paged(lens, hkv, layers)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, D, device="cuda", dtype=torch.bfloat16)
    key = (shape, batch, ctx)
    rows = []
    for variant in variants:
        fn = _decode_fn(variant)
        out = torch.empty_like(q)

        def run(fn=fn, out=out) -> torch.Tensor:
            for c in caches:
                o = fn(q, c, tables, seq_lens, out)
            return o

        row: dict[str, Any] = {"kernel": "decode", "shape": shape, "batch": batch, "ctx": ctx}
        row["variant"] = variant
        try:
            got = run().float().cpu()  # warm-up: compiles (FA4: tens of seconds the first time)
            if variant == "triton-v1":
                refs[key] = [got, None]
            err = float((got - refs[key][0]).abs().max()) if key in refs else None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            ms = do_bench(graph.replay, warmup=20, rep=100, return_mode="median") / layers
        except Exception as e:  # FA4 refusing a shape is a result, not a crash of the run
            rows.append(row | {"error": f"{type(e).__name__}: {e}"[:300]})
            continue
        us = ms * 1e3
        if variant == "triton-v1":
            refs[key][1] = us
        base_us = refs[key][1] if key in refs else None
        rows.append(
            row
            | {
                "us_per_layer": round(us, 2),
                "GB_per_s": round(nbytes / ms / 1e6, 1),
                "of_copy_bw": round(nbytes / ms / 1e-3 / bw, 3),
                "speedup_vs_v1": round(base_us / us, 3) if base_us else None,
                "max_abs_diff_vs_v1": None if err is None else round(err, 4),
            }
        )
        del graph
    caches.clear()
    torch.cuda.empty_cache()
    return rows


def bench_prefill(shape: str, n_seqs: int, q_len: int, prefix: int, fa4: bool) -> list[dict]:
    from triton.testing import do_bench

    from asyncllm.engine.kernels import fa4_attention
    from asyncllm.engine.kernels.prefill_attention import (
        build_prefill_work,
        paged_prefill_attention,
        prefill_block_m,
    )

    hq, hkv = HEADS[shape]
    lens = [prefix + q_len] * n_seqs
    caches, tables = _paged(lens, hkv, 1)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(n_seqs * q_len, hq, D, device="cuda", dtype=torch.bfloat16)
    qsl = [i * q_len for i in range(n_seqs + 1)]
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    bm = prefill_block_m(q_len)
    work = torch.tensor(build_prefill_work(qsl, bm), dtype=torch.int32, device="cuda").view(-1, 2)
    fns = {
        "triton": lambda: paged_prefill_attention(
            q, caches[0], tables, qsl_t, seq_lens, D**-0.5, work, bm
        )
    }
    if fa4:
        fns["fa4"] = lambda: fa4_attention.prefill(
            q, caches[0], tables, qsl_t, seq_lens, q_len, D**-0.5
        )
    pairs = n_seqs * sum(prefix + i + 1 for i in range(q_len))
    flops = 4 * pairs * D * hq
    rows, base = [], None
    ref = fns["triton"]().float()
    for name, fn in fns.items():
        row = {"kernel": "prefill", "shape": shape, "seqs": n_seqs, "q_len": q_len}
        row |= {"prefix": prefix, "variant": name}
        try:
            err = float((fn().float() - ref).abs().max())
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
        except Exception as e:
            rows.append(row | {"error": f"{type(e).__name__}: {e}"[:300]})
            continue
        base = base or ms
        rows.append(
            row
            | {
                "us": round(ms * 1e3, 1),
                "TFLOP_per_s": round(flops / ms / 1e9, 1),
                "speedup_vs_triton": round(base / ms, 3),
                "max_abs_diff_vs_triton": round(err, 4),
            }
        )
    return rows


def bench_engine(variants: list[str], num_requests: int, timeout: int, bw: float) -> list[dict]:
    from asyncllm.bench import model, results
    from asyncllm.bench.peer import anchor_workload

    shape = "qwen3-0.6b"
    cfg = model.SHAPES[shape]
    mdir = model.build_model_dir(model.shape_dir(shape), shape=cfg)
    wl = anchor_workload(cfg["vocab_size"], n=num_requests)
    prompt_lens = [len(p) for p, _ in wl["requests"]]
    out_lens = [o for _, o in wl["requests"]]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(wl, f)
        wl_path = f.name
    rows, base = [], None
    for name in variants:
        decode, prefill = ENGINE_VARIANTS[name]
        env = dict(os.environ, ASYNCLLM_DECODE_ATTENTION=decode, ASYNCLLM_PREFILL_ATTENTION=prefill)
        cmd = [sys.executable, "-m", "asyncllm.bench.peer_run", "asyncllm", str(mdir), wl_path]
        cmd += ["--what", "throughput"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timeout"
        paths = [ln for ln in err.splitlines() if "kernel paths" in ln][-1:]
        recs = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
        row: dict[str, Any] = {"kernel": "engine", "shape": shape, "variant": name}
        row |= {"decode": decode, "prefill": prefill, "kernel_paths": paths[0] if paths else None}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if not recs:
            rows.append(row | {"error": f"exit {rc}: {err[-1500:]}"})
            continue
        tps = recs[0]["tok_per_s"]
        base = base or tps
        rows.append(
            row
            | {
                "tok_per_s": round(tps, 1),
                "elapsed_s": round(recs[0]["elapsed_s"], 3),
                "engine_start_s": recs[0]["engine_start_s"],
                "speedup_vs_v1": round(tps / base, 3),
            }
        )
    os.unlink(wl_path)
    roof = results.throughput_roofline(
        prompt_lens,
        out_lens,
        model.weight_bytes(cfg),
        model.kv_bytes_per_token(cfg),
        bandwidth=bw,
    )
    for r in rows:
        if "tok_per_s" in r:
            r["of_roofline"] = round(r["tok_per_s"] / roof["tok_per_s"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench.attn_ab", description=__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--parts", default="decode,sweep,prefill,engine")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--contexts", default="512,2048,U[100,2048]")
    p.add_argument("--shapes", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--engine-variants", default=",".join(ENGINE_VARIANTS))
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--engine-timeout", type=int, default=150)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attn_ab needs a CUDA GPU", file=sys.stderr)
        return 2
    from asyncllm.bench import results
    from asyncllm.engine.kernels import fa4_attention

    fa4 = fa4_attention.available()
    bw = results.measure_copy_bandwidth()
    head = {"copy_bandwidth_TB_per_s": round(bw / 1e12, 3), "fa4_available": fa4}
    head |= {"commit": results.git_commit(), "gpu": torch.cuda.get_device_name()}
    print(json.dumps(head), flush=True)
    rows: list[dict] = []
    parts = set(a.parts.split(","))
    refs: dict[tuple, Any] = {}

    def emit(new: list[dict]) -> None:
        for r in new:
            print(json.dumps(r), flush=True)
        rows.extend(new)
        if a.json:  # after every case: a run stopped at its time limit keeps what it measured
            Path(a.json).write_text(json.dumps({**head, "rows": rows}, indent=1))

    def decode_pass(variants: list[str]) -> None:
        for shape in a.shapes.split(","):
            for batch in (int(b) for b in a.batches.split(",")):
                for ctx in re.split(r",(?![^\[]*\])", a.contexts):  # "U[100,2048]" is one
                    emit(bench_decode(shape, batch, ctx, variants, bw, refs))

    # FA4 last among the decode rows: an error of its kernels cannot cost the Triton rows
    if "decode" in parts:
        decode_pass(["triton-v1", "triton-v2"])
    if "sweep" in parts:  # ratios to v1 of the same case (rows above)
        for batch in (64, 256):
            emit(bench_decode("qwen3-0.6b", batch, "U[100,2048]", SWEEP, bw, refs))
    if "decode" in parts and fa4:
        decode_pass(["fa4"])
    if "prefill" in parts:
        for shape in a.shapes.split(","):
            emit(bench_prefill(shape, 8, 1024, 0, fa4))
            emit(bench_prefill(shape, 2, 512, 3000, fa4))
    if "engine" in parts:
        names = [v for v in a.engine_variants.split(",") if fa4 or "fa4" not in v]
        emit(bench_engine(names, a.num_requests, a.engine_timeout, bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
