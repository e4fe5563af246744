"""python -m asyncllm.bench moe [--smoke]: the mixture-of-experts benchmark (issue 14).

Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, moe_intermediate 768, hidden 2048) with
random bf16 weights drawn on the GPU (load_format="dummy": only config.json and a tokenizer are
written, no 61 GB of safetensors), on nano-vllm's workload (256 requests, prompt and output
lengths U[100, 1024], random ids, temperature 0.6, EOS ignored, detokenized) and one stream
(256 prompt tokens, 256 output tokens).

Roofline: each decode step reads the attention, router, norm and head weights once and, per
layer, the weights of the experts the step's batch hits: E * (1 - (1 - k/E)^B) of them for B
sequences routed uniformly at random; plus every output token reading its context's KV once; at
the device-to-device copy rate measured in the same run. All sequences decode together (a
sequence of output length o takes part in decode steps 1 .. o-1), prefill is not counted.

`--smoke`: a tiny model of the same family on the CPU in float32 (seconds; CI runs it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,  # dense layers' size: Qwen3-30B-A3B has none (mlp_only_layers=[])
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
SMOKE = dict(
    QWEN3_30B_A3B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
)
TEMPERATURE = 0.6  # nano-vllm's bench.py
DETOKENIZE = True


# ---- roofline -------------------------------------------------------------------------------------
def expected_experts_hit(batch: int, num_experts: int, top_k: int) -> float:
    """Distinct experts a batch of `batch` tokens hits in a layer when each token picks k distinct
    experts uniformly at random: each expert is missed by a token with probability 1 - k/E."""
    if batch <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def dense_weight_bytes(shape: dict, dtype_bytes: int = 2) -> int:
    """What every decode step reads whatever the routing: attention, norms, routers, final norm,
    the (untied) head. The embedding lookup touches a few rows only."""
    h, d = shape["hidden_size"], shape["head_dim"]
    hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 2 * h + 2 * d + shape["num_experts"] * h
    return (shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * h + h) * dtype_bytes


def expert_bytes(shape: dict, dtype_bytes: int = 2) -> int:
    """One expert of one layer: gate, up and down."""
    return 3 * shape["hidden_size"] * shape["moe_intermediate_size"] * dtype_bytes


def step_weight_bytes(shape: dict, batch: int, dtype_bytes: int = 2) -> float:
    hit = expected_experts_hit(batch, shape["num_experts"], shape["num_experts_per_tok"])
    experts = shape["num_hidden_layers"] * hit * expert_bytes(shape, dtype_bytes)
    return dense_weight_bytes(shape, dtype_bytes) + experts


def kv_bytes_per_token(shape: dict, dtype_bytes: int = 2) -> int:
    layers, hkv, d = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    return 2 * layers * hkv * d * dtype_bytes


def throughput_roofline(
    prompt_lens: list[int], output_lens: list[int], shape: dict, bandwidth: float
) -> dict[str, float]:
    """Output tok/s if each decode step only read the weights it needs at that batch (dense ones
    plus the experts expected hit) and each running sequence's KV, at `bandwidth`."""
    weight_bytes = 0.0
    batches = []
    for s in range(1, max(output_lens)):
        batch = sum(1 for o in output_lens if o > s)
        batches.append(batch)
        weight_bytes += step_weight_bytes(shape, batch)
    kv_reads = sum(sum(range(p + 1, p + o)) for p, o in zip(prompt_lens, output_lens, strict=True))
    weight_s = weight_bytes / bandwidth
    kv_s = kv_reads * kv_bytes_per_token(shape) / bandwidth
    return {
        "tok_per_s": sum(output_lens) / (weight_s + kv_s),
        "weight_read_s": weight_s,
        "kv_read_s": kv_s,
        "decode_steps": len(batches),
        "mean_batch": sum(batches) / max(1, len(batches)),
        "experts_hit_at_mean_batch": expected_experts_hit(
            round(sum(batches) / max(1, len(batches))),
            shape["num_experts"],
            shape["num_experts_per_tok"],
        ),
        "bandwidth_bytes_per_s": bandwidth,
    }


def latency_roofline_ms(shape: dict, prompt_len: int, out_len: int, bandwidth: float) -> float:
    """ms per output token of one stream: a step reads the dense weights, k experts per layer and
    the context's KV."""
    kv = sum(range(prompt_len + 1, prompt_len + out_len)) / max(1, out_len - 1)
    per_step = step_weight_bytes(shape, 1) + kv * kv_bytes_per_token(shape)
    return per_step / bandwidth * 1e3


def cpu_copy_bandwidth(mib: int = 64, reps: int = 5) -> float:
    """The smoke mode's stand-in for the GPU copy rate (read + write bytes per second)."""
    import torch

    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


# ---- the run --------------------------------------------------------------------------------------
def write_model_dir(out: Path, shape: dict) -> Path:
    """config.json and a word-level tokenizer covering the vocabulary: all load_format="dummy"
    needs (the weights are drawn on the device)."""
    from transformers import Qwen3MoeConfig

    from asyncllm.bench.model import _tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3MoeConfig(**shape)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(out)
    _tokenizer(out, shape["vocab_size"], shape["eos_token_id"])
    return out


def _engine_kw(args: argparse.Namespace, smoke: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"load_format": "dummy", "enforce_eager": args.enforce_eager}
    if smoke:
        kw.update(device="cpu", dtype="float32", max_model_len=256)
    else:
        kw.update(dtype="bfloat16", max_model_len=4096)  # as the peer benchmark
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kw


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from asyncllm.bench import engine_runs, results, workloads

    smoke = bool(args.smoke)
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("moe needs a CUDA GPU (or --smoke for the CPU)")
    shape = SMOKE if smoke else QWEN3_30B_A3B
    vocab = shape["vocab_size"]
    if smoke:
        n, lo, hi, lat_in, lat_out = 8, 4, 16, 8, 8
        reqs = workloads.throughput_workload(n=n, lo=lo, hi=hi, vocab=vocab)
        lat_reqs = [
            workloads.latency_workload(lat_in, lat_out, vocab=vocab, seed=100 + i) for i in range(4)
        ]
    else:  # the very requests the peer benchmark gives nano-vllm (its bench.py's draw)
        from asyncllm.bench.peer import anchor_workload

        wl = anchor_workload(vocab, n=args.num_requests)
        n, lo, hi = len(wl["requests"]), 100, 1024
        reqs = [workloads.Request(p, o) for p, o in wl["requests"]]
        lat_in, lat_out = 256, wl["latency_output_len"]
        lat_reqs = [workloads.Request(p, lat_out) for p in wl["latency_prompts"]]
    bw = cpu_copy_bandwidth() if smoke else results.measure_copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e12:.3f} TB/s", flush=True)
    prompt_lens = [len(r.prompt_token_ids) for r in reqs]
    roof = throughput_roofline(prompt_lens, [r.max_tokens for r in reqs], shape, bw)
    lat_roof = latency_roofline_ms(shape, lat_in, lat_out, bw)
    with tempfile.TemporaryDirectory(prefix="asyncllm-moe-") as tmp:
        mdir = write_model_dir(Path(tmp), shape)
        kw = _engine_kw(args, smoke)
        llm, load_s = engine_runs.make_llm(mdir, **kw)
        print(f"engine start (random weights drawn on the device): {load_s:.1f} s", flush=True)
        ours = engine_runs.run_throughput(llm, reqs, TEMPERATURE, DETOKENIZE)
        ours["engine_start_s"] = load_s
        print("throughput:", json.dumps(ours), flush=True)
        lat = engine_runs.run_latency(llm, lat_reqs, TEMPERATURE, DETOKENIZE)
        print("latency:", json.dumps(lat), flush=True)
    name = "tiny-smoke" if smoke else "qwen3-30b-a3b"
    model_desc = (
        f"{name} shape: {shape['num_hidden_layers']} layers, {shape['num_experts']} experts, "
        f"top-{shape['num_experts_per_tok']}, moe_intermediate {shape['moe_intermediate_size']}, "
        f"hidden {shape['hidden_size']}; random {'float32' if smoke else 'bf16'} weights "
        "(load_format=dummy, normal(0, 0.02))"
    )
    common = dict(
        shape=name,
        temperature=TEMPERATURE,
        detokenize=DETOKENIZE,
        model=model_desc,
        engine_args=kw,
    )
    thr = results.record(
        "moe_throughput",
        ours["output_tok_per_s"],
        "tok/s",
        None,
        None,
        roof["tok_per_s"],
        workload=f"{n} requests, prompt and output lengths U[{lo},{hi}], random ids, EOS "
        f"ignored, temperature {TEMPERATURE}, detokenized (nano-vllm's bench.py)",
        asyncllm=ours,
        roofline=dict(
            roof,
            basis="per decode step: dense weights + the experts expected hit at that batch "
            "(E(1-(1-k/E)^B)) per layer, + each token's context KV, at the measured copy rate",
        ),
        **common,
    )
    latr = results.record(
        "moe_latency",
        lat["ms_per_token"],
        "ms/token",
        None,
        None,
        lat_roof,
        workload=f"1 stream, {lat_in} prompt tokens, {lat_out} output tokens, temperature "
        f"{TEMPERATURE}, detokenized; median of 3 runs after a warm-up, own prompt each",
        asyncllm=lat,
        roofline={
            "ms_per_token": lat_roof,
            "basis": "per token: dense weights + k experts per layer + the context's KV, at "
            "the measured copy rate",
            "bandwidth_bytes_per_s": bw,
        },
        **common,
    )
    return [thr, latr]
