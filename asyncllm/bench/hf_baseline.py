"""transformers' own generate on the same model and workload: the baseline of every benchmark."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from asyncllm.bench.workloads import Request


def load_hf(model_dir: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    return model


def _generate(
    model, batch: list[list[int]], max_new: int, pad_id: int, ignore_eos: bool = False
) -> torch.Tensor:
    """Greedy, exactly `max_new` new tokens per row. Default: EOS suppressed (min_new_tokens sets
    its logit to -inf, which changes the argmax where EOS would win). ignore_eos: EOS may be
    generated and generation goes on past it, as the engines' ignore_eos (no EOS ids to stop on)."""
    width = max(len(p) for p in batch)
    dev = model.device
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):  # left padding, as generate wants for decoder-only models
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    length = {"eos_token_id": []} if ignore_eos else {"min_new_tokens": max_new}
    with torch.no_grad():
        return model.generate(
            ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
            **length,
        )


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def hf_throughput(
    model, reqs: list[Request], batch_size: int = 64, pad_id: int = 0
) -> dict[str, Any]:
    """Padded batches of `batch_size`; each batch runs to its longest output, and only the
    tokens each request asked for count."""
    _generate(model, [reqs[0].prompt_token_ids[:16]], 4, pad_id)  # warm-up
    _sync(model)
    t0 = time.perf_counter()
    useful = 0
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s : s + batch_size]
        _generate(
            model, [r.prompt_token_ids for r in chunk], max(r.max_tokens for r in chunk), pad_id
        )
        useful += sum(r.max_tokens for r in chunk)
    _sync(model)
    elapsed = time.perf_counter() - t0
    return {
        "elapsed_s": elapsed,
        "output_tokens": useful,
        "output_tok_per_s": useful / elapsed,
        "requests": len(reqs),
        "batch_size": batch_size,
    }


def hf_latency(model, req: Request, pad_id: int = 0) -> dict[str, Any]:
    _generate(model, [req.prompt_token_ids[:16]], 4, pad_id)  # warm-up
    _sync(model)
    t0 = time.perf_counter()
    out = _generate(model, [req.prompt_token_ids], req.max_tokens, pad_id)
    _sync(model)
    elapsed = time.perf_counter() - t0
    n = out.shape[1] - len(req.prompt_token_ids)
    return {"elapsed_s": elapsed, "output_tokens": n, "ms_per_token": elapsed * 1e3 / n}
