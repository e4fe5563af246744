"""`python -m asyncllm.bench.quant_kernels [--out DIR] [--m 1,4,16,64,256]`: the quantized GEMMs
old against new on Llama-3-8B's linears (N x K: q/k/v 6144 x 4096, gate/up 28672 x 4096, down
4096 x 14336, o 4096 x 4096), bf16 activations, at M rows.

Variants (each where it applies): `bf16` (cuBLAS on the bf16 weight: the anchor), int4 (GPTQ
group 128) `int4-tile` (the first kernel, ASYNCLLM_QUANT_KERNELS=tile), `int4-auto` (what the
engine now runs), `int4-gemv` and `int4-dot` forced, `int4-dequant` (dequantize + cuBLAS);
fp8 per-channel `fp8-w8a8` (per-token quantization + _scaled_mm) and `fp8-w8a16` (the GEMV).

Timing: a CUDA graph launching the variant once on each of enough weight copies that they do not
fit in L2 (>= 256 MB), replayed; per call = replay time / copies (the launch gaps inside a graph
are counted, as in a graphed decode step). Reported: microseconds per call, GB/s of weight bytes
read (weights + scales + zeros) and that over the copy bandwidth measured in the same run.
Writes quant-kernels-<gpu>-<date>.json (one record per variant, shape and M)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asyncllm.bench import results

LINEARS = {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "o": (4096, 4096)}
GROUP = 128
FP8 = torch.float8_e4m3fn


def _time_graph(calls: list[Callable[[], Any]], replays: int = 10) -> float:
    """Seconds per call: the calls captured once in a graph, replayed."""
    for c in calls:  # compile and warm
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        graph.replay()
    b.record()
    b.synchronize()
    del graph
    return a.elapsed_time(b) / 1e3 / (replays * len(calls))


def _copies(nbytes: int) -> int:
    return max(2, -(-(256 << 20) // nbytes))


def bench_shape(
    name: str, n: int, k: int, ms: list[int], bw: float, dev: torch.device | None = None
) -> list[dict[str, Any]]:
    from asyncllm.engine.kernels import quant_gemv
    from asyncllm.engine.kernels.fp8_quant import per_token_fp8
    from asyncllm.engine.kernels.quant_gemm import INT4, dequantize, int4_gemm

    dev = dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    g = k // GROUP
    int4_bytes = n * k // 2 + g * n * 3
    fp8_bytes = n * k + 4 * n
    bf16_bytes = 2 * n * k
    c4, c8, c16 = _copies(int4_bytes), _copies(fp8_bytes), _copies(bf16_bytes)
    w4 = [
        (
            torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device=dev, dtype=torch.int32,
                          generator=gen),
            torch.full((g, n), 0.004, device=dev, dtype=torch.float16),
            torch.full((g, n), 8, device=dev, dtype=torch.uint8),
        )
        for _ in range(c4)
    ]  # fmt: skip
    w8 = [
        (
            (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(FP8),
            torch.rand(1, n, device=dev, generator=gen) * 0.01,
        )
        for _ in range(c8)
    ]
    w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(c16)]
    quant_gemv.reserve(dev)
    recs = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
        variants: dict[str, tuple[list[Callable[[], Any]], int]] = {
            "bf16": ([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in w16], bf16_bytes),
            "int4-tile": ([lambda t=t, x=x: int4_gemm(x, *t, GROUP, legacy=True) for t in w4], int4_bytes),
            "int4-auto": ([lambda t=t, x=x: int4_gemm(x, *t, GROUP) for t in w4], int4_bytes),
            "int4-dequant": (
                [lambda t=t, x=x: x @ dequantize(INT4, *t, n, k, GROUP, 1, x.dtype, False) for t in w4],
                int4_bytes,
            ),
            "fp8-w8a8": ([lambda t=t, x=x: _w8a8(per_token_fp8, x, *t) for t in w8], fp8_bytes),
        }  # fmt: skip
        auto = quant_gemv.int4_plan(m, n, k, GROUP, dev)
        for kind in ("gemv", "dot"):
            if (kind == "gemv" and m <= 16) or (kind == "dot" and m <= 256):
                plan = _forced_plan(kind, m, n, k, dev)
                variants[f"int4-{kind}"] = (
                    [lambda t=t, p=plan, x=x: quant_gemv.int4_gemm_small(x, *t, GROUP, False, p)
                     for t in w4],
                    int4_bytes,
                )  # fmt: skip
        if m <= 16:
            variants["fp8-w8a16"] = (
                [lambda t=t, x=x: quant_gemv.fp8_gemv(x, t[0], t[1], None) for t in w8],
                fp8_bytes,
            )
        base = None
        for var, (calls, nbytes) in variants.items():
            try:
                sec = _time_graph(calls)
            except Exception as e:  # a variant that fails is reported, the rest still run
                print(f"{name} M={m} {var}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            gbps = nbytes / sec / 1e9
            if var == "bf16":
                base = sec
            rec = results.record(
                "quant_kernel", sec * 1e6, "us", "bf16" if var != "bf16" else None,
                base * 1e6 if base and var != "bf16" else None, nbytes / bw * 1e6,
                variant=var, linear=name, n=n, k=k, m=m, weight_bytes=nbytes,
                gb_per_s=round(gbps, 1), share_of_copy_bw=round(gbps * 1e9 / bw, 3),
                copy_bandwidth_bytes_per_s=bw,
                plan=str(auto) if var == "int4-auto" else None,
            )  # fmt: skip
            recs.append(rec)
            print(f"{name:8s} M={m:4d} {var:13s} {sec * 1e6:8.1f} us {gbps:7.0f} GB/s "
                  f"{gbps * 1e9 / bw:5.2f} of copy bw  x bf16 {rec['ratio_to_baseline']}",
                  flush=True)  # fmt: skip
    del w4, w8, w16
    torch.cuda.empty_cache()
    return recs


def _w8a8(per_token_fp8, x, w, s):
    """fp8.py's W8A8 path: the activation quantization kernel is part of its cost."""
    xq, xs = per_token_fp8(x)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=x.dtype)


def _forced_plan(kind: str, m: int, n: int, k: int, dev: torch.device):
    from asyncllm.engine.kernels import quant_gemv

    saved = quant_gemv.GEMV_MAX_M
    try:
        quant_gemv.GEMV_MAX_M = 1 << 30 if kind == "gemv" else 0
        return quant_gemv.int4_plan(m, n, k, GROUP, dev)
    finally:
        quant_gemv.GEMV_MAX_M = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench.quant_kernels")
    p.add_argument("--m", default="1,4,16,64,256")
    p.add_argument("--linears", default=",".join(LINEARS))
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_kernels needs CUDA", file=sys.stderr)
        return 2
    bw = results.measure_copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    ms = [int(v) for v in a.m.split(",")]
    recs: list[dict[str, Any]] = []
    for name in a.linears.split(","):
        n, k = LINEARS[name]
        recs += bench_shape(name, n, k, ms, bw)
    path = results.write(recs, "quant-kernels", Path(a.out))
    print(f"wrote {path}")
    summary = {f"{r['linear']} M={r['m']} {r['variant']}": r["share_of_copy_bw"] for r in recs}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
