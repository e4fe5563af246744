"""Host cost of a whole engine step at a decode batch, on the CPU, with a stub model: the real
scheduler, block manager, step writer, runner input building (update_states + prepare), sampler
launch and resolve, finish rules, detokenizer and output building; the model's forward is an empty
tensor and its logits a fixed random [N, 2048] table (token ids from the whole vocabulary through
a fixed permutation), sampled at temperature 0.6. What the GPU run pays on the host per step,
without the GPU.

    python -m ops.bench.host_step [--batch 256] [--steps 200] [--tokenizer wordlevel|bytelevel]

`wordlevel` is the peer benchmark's tokenizer (asyncllm.bench.model: one word per id, 151,936 ids);
`bytelevel` the tests' trained byte-level BPE (as Qwen's). Prints one JSON line: seconds of host
work per decode step (median over steps, wall and this thread's CPU time) for each entry of
`--schedule`: the levers (asyncllm/bench/levers.py: on, off, -NAME, +NAME) are switched on the one
engine between entries, each entry decoding a fresh batch, so on/off alternate in one process."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from asyncllm.config import CacheConfig, ModelConfig, SchedulerConfig
from asyncllm.engine.llm_engine import LLMEngine
from asyncllm.engine.model_runner import ModelRunner
from asyncllm.sampling_params import RequestOutputKind, SamplingParams

SAMPLE_WIDTH = 2048


class _StubModel(torch.nn.Module):
    """No weights: hidden states are empty rows, logits a fixed table's first rows."""

    def __init__(self, vocab: int, max_rows: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(max_rows, SAMPLE_WIDTH, generator=g)
        # The stub samples from SAMPLE_WIDTH columns; a permutation spreads them over the vocab.
        usable = vocab - 300 if vocab > 4 * SAMPLE_WIDTH else vocab  # clear of Qwen's specials
        self.perm = torch.randperm(usable, generator=g).repeat(-(-SAMPLE_WIDTH // usable))
        self.perm = self.perm[:SAMPLE_WIDTH]

    def forward(self, ids, pos, kv_caches, meta):
        return torch.empty(ids.shape[0], 1)

    def compute_logits(self, hidden):
        return self.table[: hidden.shape[0]]


def _tokenizer(kind: str, vocab: int, tmp: Path):
    from transformers import AutoTokenizer

    if kind == "wordlevel":
        from asyncllm.bench.model import _tokenizer as word_tokenizer

        word_tokenizer(tmp, vocab, 0)
        return AutoTokenizer.from_pretrained(tmp)
    from tests.tiny_models import build_tokenizer  # a checkout's tests/: the trained BPE

    return build_tokenizer(tmp)


def build_engine(batch: int, kind: str, tmp: Path, max_model_len: int = 4096) -> LLMEngine:
    tok = _tokenizer(kind, 151_936, tmp)
    vocab = len(tok)
    hf = SimpleNamespace(vocab_size=vocab, eos_token_id=0)
    mc = ModelConfig(
        path=str(tmp),
        hf_config=hf,
        dtype=torch.float32,
        device=torch.device("cpu"),
        max_model_len=max_model_len,
        served_model_name="stub",
    )
    blocks = batch * (-(-max_model_len // 16))
    cc = CacheConfig(16, blocks, True)
    sc = SchedulerConfig(batch, 8192, max_model_len, async_scheduling=True)
    model = _StubModel(vocab, batch * 2)
    runner = ModelRunner(mc, cc, sc, model, None)
    eng = LLMEngine(mc, cc, sc, tok, runner)
    # Sampled columns -> real token ids (the stub's logits are only SAMPLE_WIDTH wide).
    perm = model.perm.tolist()
    launch = eng.sampler.launch

    def mapped(logits, rows, bitmask=None):
        pend = launch(logits, rows, bitmask)
        pend.tokens = model.perm[pend.tokens]
        inner = pend._decode

        def decode(flat):
            out = inner(flat)
            out.token_ids = [perm[t] for t in out.token_ids]
            return out

        pend._decode = decode
        return pend

    eng.sampler.launch = mapped
    # What build_engine_parts does for a CUDA engine (ASYNCLLM_GC_FREEZE).
    from asyncllm.engine.engine_builder import freeze_gc_heap

    freeze_gc_heap()
    return eng


def _decode_steps(eng: LLMEngine, batch: int, steps: int, prompt: int, tag: str) -> list:
    """Add `batch` requests, run their prefill, then `steps` decode steps: (wall, CPU) seconds of
    each decode step (CPU: this thread's time, less disturbed by a busy machine)."""
    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        ids = torch.randint(0, eng.vocab_size, (prompt,), generator=g).tolist()
        sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 8)
        sp.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate sets it
        eng.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, sp)
    while any(s.num_output_tokens == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    eng.step()
    out = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        eng.step()
        out.append((time.perf_counter() - t0, time.thread_time() - c0))
    eng.abort_request(list(eng.requests))
    while eng.step():  # the in-flight step
        pass
    return out


def run(batch: int, steps: int, kind: str, schedule: list[str], prompt: int = 512) -> dict:
    """One engine; for each schedule entry (levers.parse_entry) the levers are switched on it and
    a fresh batch decodes `steps` steps."""
    from asyncllm.bench.levers import parse_entry, set_levers

    runs = []
    with tempfile.TemporaryDirectory() as d:
        eng = build_engine(batch, kind, Path(d))
        for k, entry in enumerate(schedule):
            set_levers(eng, parse_entry(entry))
            st = _decode_steps(eng, batch, steps, prompt, f"{k}")
            runs.append(
                {
                    "config": entry,
                    "median_wall_ms": statistics.median(w for w, _ in st) * 1e3,
                    "median_cpu_ms": statistics.median(c for _, c in st) * 1e3,
                    # The mean holds the collector's full passes, which hit a few steps only.
                    "mean_cpu_ms": statistics.mean(c for _, c in st) * 1e3,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for entry in dict.fromkeys(schedule):
        summary[entry] = {
            k: round(statistics.mean(r[k] for r in runs if r["config"] == entry), 2)
            for k in ("median_cpu_ms", "mean_cpu_ms")
        }
    return {
        "benchmark": "host_step",
        "batch": batch,
        "steps": steps,
        "tokenizer": kind,
        "runs": runs,
        "cpu_ms_per_step": summary,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokenizer", choices=["wordlevel", "bytelevel"], default="wordlevel")
    p.add_argument("--schedule", default="off,on,off,on,-host,-detok,-gc")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(a.batch, a.steps, a.tokenizer, a.schedule.split(","))), flush=True)


if __name__ == "__main__":
    main()
