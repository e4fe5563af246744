"""One format of the quant benchmark in a process of its own:
`python -m asyncllm.bench.quant_run bf16|fp8|gptq-int4 MODEL_DIR WORKLOAD_JSON [--what ...]`.

The model directory holds only config.json and a tokenizer: the loader's checkpoint reader is
replaced here by one drawing each tensor at random on the device, by the checkpoint's names
(GPTQ: qweight / qzeros / scales / g_idx). Prints peer_run's `RESULT {json}` lines."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch

from asyncllm.bench import peer_run
from asyncllm.bench.quant import GPTQ_GROUP, INIT_STD

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_checkpoint(
    cfg: Any, gptq: bool, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors by transformers' names, drawn on `device` one at a time."""
    gen = torch.Generator(device=device).manual_seed(0)
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"q_proj": (hq * d, h), "k_proj": (hkv * d, h), "v_proj": (hkv * d, h),
              "o_proj": (h, hq * d), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, device=device, dtype=torch.bfloat16)
        return t.normal_(0.0, INIT_STD, generator=gen)

    yield "model.embed_tokens.weight", normal(cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}"
        yield f"{pre}.input_layernorm.weight", torch.ones(h, device=device)
        yield f"{pre}.post_attention_layernorm.weight", torch.ones(h, device=device)
        for name in _LINEARS:
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            n, k = shapes[name]
            stem = f"{pre}.{part}.{name}"
            if not gptq:
                yield f"{stem}.weight", normal(n, k)
                continue
            g = k // GPTQ_GROUP
            words = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device=device,
                                  dtype=torch.int32, generator=gen)  # fmt: skip
            yield f"{stem}.qweight", words
            yield f"{stem}.qzeros", torch.full((g, n // 8), 0x77777777, device=device,
                                               dtype=torch.int32)  # fmt: skip
            # q - 8 is uniform on [-8, 7] (std ~4.6): scales giving weights of std INIT_STD
            yield f"{stem}.scales", torch.full((g, n), INIT_STD / 4.6, device=device,
                                               dtype=torch.float16)  # fmt: skip
            yield f"{stem}.g_idx", torch.arange(k, device=device, dtype=torch.int32) // GPTQ_GROUP
    yield "model.norm.weight", torch.ones(h, device=device)
    yield "lm_head.weight", normal(cfg.vocab_size, h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("format", choices=["bf16", "fp8", "gptq-int4"])
    p.add_argument("model_dir")
    p.add_argument("workload")
    p.add_argument("--what", default="throughput,latency")
    a = p.parse_args(argv)
    with open(a.workload) as f:
        workload = json.load(f)
    from transformers import AutoConfig

    from asyncllm.engine import loader

    cfg = AutoConfig.from_pretrained(a.model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gptq = a.format == "gptq-int4"
    loader.iter_safetensors = lambda path: random_checkpoint(cfg, gptq, device)
    kw = {"quantization": "fp8"} if a.format == "fp8" else {}
    eng = peer_run._AsyncLLM(a.model_dir, workload["max_model_len"], **kw)
    eng.name = f"asyncllm-{a.format}"
    peer_run.measure(eng, workload, set(a.what.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
