"""CPU decode attention: the paged C kernel (asyncllm.engine.kernels.cpu_decode_attention) against
the torch backend's gather + masked SDPA path; and end-to-end A/Bs of the other CPU fast paths.

python -m asyncllm.bench.cpu_attention micro [--json PATH]   one layer's decode attention, ms per call
python -m asyncllm.bench.cpu_attention e2e [--switch S] [--json PATH]   the CPU benchmark's asyncllm
    run, A/B of S (comma-separated, toggled together): `attention` (the C decode attention vs
    `ASYNCLLM_CPU_ATTENTION=torch`, the default), `fused` (the C fused elementwise kernels vs
    `ASYNCLLM_CPU_FUSED=0`), `linear` (oneDNN `_linear_pointwise` vs `mkldnn_linear` with
    to_mkldnn/to_dense copies, the same packed weights re-laid out in place)
python -m asyncllm.bench.cpu_attention profile [--old S] [--json PATH]   the same run once (after an
    untimed one), wall time per part (perf_counter around each layer kind, the attention, the
    vocabulary projection, the sampler; the rest is the host), with the paths in S old

micro: SmolLM2-135M shapes (Hq 9, Hkv 3, D 64, block 16), batch 64, contexts drawn from the CPU
benchmark's range (~40..170) and a few fixed ones; each timing cycles through 30 layers' caches
(as the model does) so the cache is not served from L3.
e2e: `LLM(device="cpu")` on asyncllm.bench.cpu's 64 chat prompts x 128 greedy tokens (EOS ignored),
in one process, the switched paths new and old in ABBA order after an untimed pass (so every
timed pass sees the same prefix-cache state); identical tokens required.
Run on a quiet machine: the 1-minute load goes into the record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

from asyncllm import envs

HQ, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30


def _paged(lens: list[int], layers: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BS) for n in lens]
    nb = sum(blocks) + 1
    perm = (torch.randperm(nb - 1, generator=gen) + 1).tolist()  # scattered, as after a while
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    caches = [torch.randn(2, nb, BS, HKV, D, generator=gen) for _ in range(layers)]
    q = torch.randn(len(lens), HQ, D, generator=gen)
    return caches, tables, torch.tensor(lens, dtype=torch.int32), q


def _time(fn, caches, reps: int) -> float:
    """Median over reps of the mean ms per call over one pass of all layers' caches."""
    for c in caches[:3]:
        fn(c)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in caches:
            fn(c)
        samples.append((time.perf_counter() - t0) * 1e3 / len(caches))
    return sorted(samples)[len(samples) // 2]


def micro(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from asyncllm.engine.kernels import cpu_decode_attention as cda
    from asyncllm.engine.layers.attention import TorchAttentionBackend

    torch.set_num_threads(args.threads)
    if cda.load() is None:
        sys.exit("the CPU kernel did not build (see the log); nothing to compare")
    rng = random.Random(0)
    cases = {
        "ragged 40..170": [rng.randint(40, 170) for _ in range(args.batch)],
        "all 40": [40] * args.batch,
        "all 100": [100] * args.batch,
        "all 170": [170] * args.batch,
        "ragged 1..1024": [rng.randint(1, 1024) for _ in range(args.batch)],
    }
    scale = D**-0.5
    rows = []
    for name, lens in cases.items():
        caches, tables, seq_lens, q = _paged(lens, LAYERS, 1)
        max_len = max(lens)

        def old(c, tables=tables, seq_lens=seq_lens, q=q, max_len=max_len):
            return TorchAttentionBackend._decode_torch(q, c, tables, seq_lens, max_len, scale)

        def new(c, tables=tables, seq_lens=seq_lens, q=q):
            return cda.decode(q, c, tables, seq_lens, scale)

        diff = (old(caches[0]) - new(caches[0])).abs().max().item()
        t_old, t_new = _time(old, caches, args.reps), _time(new, caches, args.reps)
        kv_mb = sum(lens) * HKV * D * 4 * 2 / 1e6
        row = {
            "case": name,
            "batch": args.batch,
            "mean_context": round(sum(lens) / len(lens), 1),
            "torch_ms": round(t_old, 3),
            "kernel_ms": round(t_new, 3),
            "speedup": round(t_old / t_new, 2),
            "kernel_gb_per_s": round(kv_mb / t_new, 1),  # KV bytes read / time
            "max_abs_diff": diff,
        }
        rows.append(row)
        print(
            f"{name:>16}: torch {t_old:7.3f} ms  kernel {t_new:7.3f} ms  x{t_old / t_new:5.2f}"
            f"  ({row['kernel_gb_per_s']} GB/s, max diff {diff:.1e})",
            file=sys.stderr,
            flush=True,
        )
    return {
        "benchmark": "cpu_attention_micro",
        "shapes": {"hq": HQ, "hkv": HKV, "d": D, "block_size": BS, "layers_cycled": LAYERS},
        "threads": args.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rows": rows,
    }


SWITCHES = ("attention", "fused", "linear")


def _path_switch(model: Any):
    """set(name, new: bool) for "attention" (the paged C decode kernel vs the torch path) and
    "fused" (the C fused ops vs the layers' torch ops) on a built model. The engine chooses its
    paths once at start-up (asyncllm.engine.kernel_paths), so an in-process A/B flips the
    choice on the model's parts instead of the environment switches."""
    kernels = model.kernels
    chosen_decode, chosen_ops = kernels.attention.decode_kernel, kernels.fused
    holders = [m for m in model.modules() if hasattr(m, "ops")]

    def set_path(name: str, new: bool) -> None:
        if name == "attention":
            kernels.attention.decode_kernel = chosen_decode if new else False
        elif name == "fused":
            for m in holders:
                m.ops = chosen_ops if new else None
            kernels.attention.fused_ops = chosen_ops if new else None

    return set_path


def _linear_switch(model: Any):
    """set(new: bool): every PackedLinear on `_linear_pointwise` (new) or on `mkldnn_linear`
    with the activation copies (old), from the same weights."""
    from asyncllm.engine.layers.cpu_linear import PackedLinear

    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    forms = []
    for m in layers:
        if not m.pointwise:
            sys.exit("this torch has no _linear_pointwise: nothing to compare")
        w = m.weight_packed.to_dense()
        old = (w.to_mkldnn(), None if m.bias_packed is None else m.bias_packed.to_mkldnn())
        forms.append(((m.weight_packed, m.bias_packed), old))

    def set_new(new: bool) -> None:
        for m, (fnew, fold) in zip(layers, forms, strict=True):
            m.pointwise = new
            m.weight_packed, m.bias_packed = fnew if new else fold

    return set_new


def _benchmark_prompts(n: int) -> list[dict[str, list[int]]]:
    """The CPU benchmark's first `n` chat prompts as token ids (chat template applied)."""
    from asyncllm.bench.cpu import chat_prompts
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None))

    def encode(convo):
        text = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    return [{"prompt_token_ids": encode(c)} for c in chat_prompts(n)]


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from asyncllm import LLM, SamplingParams
    from asyncllm.bench.cpu import MAX_TOKENS
    from asyncllm.engine.layers.attention import TorchAttentionBackend

    switches = [x for x in args.switch.split(",") if x]
    if not switches or any(x not in SWITCHES for x in switches):
        sys.exit(f"--switch: comma-separated names from {SWITCHES}")
    torch.set_num_threads(args.threads)
    prompts = _benchmark_prompts(args.num_prompts)
    # time inside the decode attention (either path), to see the change apart from the noise
    attn = [0.0]
    inner = TorchAttentionBackend._decode

    def timed_decode(*a):
        t0 = time.perf_counter()
        out = inner(*a)
        attn[0] += time.perf_counter() - t0
        return out

    TorchAttentionBackend._decode = timed_decode  # a method: self comes first in `a`
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(None, device="cpu")
    set_linear = _linear_switch(llm.llm_engine.runner.model) if "linear" in switches else None

    set_path = _path_switch(llm.llm_engine.runner.model)

    def set_variant(new: bool) -> None:
        for name in switches:
            if name in ("attention", "fused"):
                set_path(name, new)
        if set_linear is not None:
            set_linear(new)

    def one(variant: str) -> dict[str, Any]:
        set_variant(variant == "new")
        load = round(os.getloadavg()[0], 2)
        attn[0] = 0.0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(len(x) for x in ids)
        print(
            f"{variant:>4}: {elapsed:6.2f} s  {n / elapsed:6.1f} tok/s  decode attention "
            f"{attn[0]:5.2f} s  (load before {load})",
            file=sys.stderr,
            flush=True,
        )
        return {"variant": variant, "elapsed_s": elapsed, "tok_per_s": n / elapsed,
                "decode_attention_s": attn[0], "load_before": load, "ids": ids}  # fmt: skip

    one("new")  # untimed: warm-up and the same prefix-cache state for every timed pass
    runs = [one(v) for v in ["new", "old", "old", "new"] * args.rounds]
    identical = all(r["ids"] == runs[0]["ids"] for r in runs)
    set_variant(True)

    def mean(v: str) -> float:
        xs = [r["tok_per_s"] for r in runs if r["variant"] == v]
        return sum(xs) / len(xs)

    summary = {
        "old_tok_per_s": round(mean("old"), 1),
        "new_tok_per_s": round(mean("new"), 1),
    }
    summary["speedup"] = round(summary["new_tok_per_s"] / summary["old_tok_per_s"], 3)
    print(f"{summary}, identical tokens: {identical}", file=sys.stderr, flush=True)
    return {
        "benchmark": "cpu_attention_e2e",
        "switch": switches,
        "workload": f"{len(prompts)} chat prompts, {MAX_TOKENS} greedy tokens each, EOS ignored, "
        "float32, one LLM(device='cpu'), prefix caching on, ABBA order after an untimed pass",
        "threads": args.threads,
        "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
        "identical_tokens": identical,
        **summary,
    }


def _profile_parts(model: Any, engine: Any) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap each part's forward with a perf_counter accumulator; parts are nested only where
    the names say (attention's KV write is inside `attention (backend)`)."""
    import asyncllm.engine.layers.attention as attn_mod
    from asyncllm.engine.layers.activations import SiluAndMul
    from asyncllm.engine.layers.cpu_linear import PackedLinear
    from asyncllm.engine.layers.norms import RMSNorm
    from asyncllm.engine.layers.rotary import RotaryEmbedding
    from asyncllm.engine.models.llama import Attention

    acc: dict[str, float] = {}
    calls: dict[str, int] = {}

    def wrap(owner: Any, name: str, part: str, static: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            acc[part] = acc.get(part, 0.0) + time.perf_counter() - t0
            calls[part] = calls.get(part, 0) + 1
            return out

        setattr(owner, name, staticmethod(timed) if static else timed)

    lm = getattr(model.lm_head, "packed", None)
    for m in model.modules():
        if isinstance(m, PackedLinear) and m is not lm:
            wrap(m, "forward", "linear layers (GEMM)")
    wrap(model, "compute_logits", "vocabulary projection (GEMM)")
    wrap(RMSNorm, "forward", "RMSNorm (+ residual add)")
    wrap(SiluAndMul, "forward", "SiLU-and-mul")
    wrap(RotaryEmbedding, "forward", "rotary (torch path)")
    wrap(attn_mod.TorchAttentionBackend, "forward", "attention backend (KV write + attention)")
    wrap(attn_mod.TorchAttentionBackend, "_decode", "  of it: decode attention")
    wrap(attn_mod, "write_kv_cache", "  of it: KV cache write")
    wrap(Attention, "forward", "attention layer (all of: qkv, rotary, backend, o)")
    wrap(engine.sampler, "launch", "sampler")
    wrap(engine.runner, "execute", "model runner execute (forward + logits)")
    return acc, calls


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from asyncllm import LLM, SamplingParams
    from asyncllm.bench.cpu import MAX_TOKENS

    old = [x for x in args.old.split(",") if x]
    if any(x not in SWITCHES for x in old):
        sys.exit(f"--old: comma-separated names from {SWITCHES}")
    torch.set_num_threads(args.threads)
    prompts = _benchmark_prompts(args.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(None, device="cpu")
    model = llm.llm_engine.runner.model
    for name in ("attention", "fused"):
        if name in old:
            _path_switch(model)(name, False)
    if "linear" in old:
        _linear_switch(model)(False)
    llm.generate(prompts, params, use_tqdm=False)  # untimed: warm-up, the prefix-cache state
    acc, calls = _profile_parts(model, llm.llm_engine)
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"old: {old or 'none'}; {wall:.2f} s, {n / wall:.1f} tok/s, load before {load}",
          file=sys.stderr)  # fmt: skip
    for part, t in acc.items():
        print(f"{part:>52}: {t:6.2f} s  {100 * t / wall:5.1f}%  ({calls[part]} calls)",
              file=sys.stderr)  # fmt: skip
    return {
        "benchmark": "cpu_profile",
        "old_paths": old,
        "threads": args.threads,
        "load_before": load,
        "elapsed_s": wall,
        "tok_per_s": n / wall,
        "parts_s": {k: round(v, 3) for k, v in acc.items()},
        "calls": calls,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m asyncllm.bench.cpu_attention")
    p.add_argument("mode", choices=["micro", "e2e", "profile"])
    p.add_argument("--threads", type=int, default=envs.bench_threads())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="e2e: ABBA blocks (each variant twice)")
    p.add_argument("--switch", default="attention", help="e2e: what to A/B (see the docstring)")
    p.add_argument("--old", default="", help="profile: the paths to run old (see e2e's --switch)")
    p.add_argument("--json", help="also write the record here")
    args = p.parse_args(argv)
    rec = {"micro": micro, "e2e": e2e, "profile": profile}[args.mode](args)
    text = json.dumps(rec, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
