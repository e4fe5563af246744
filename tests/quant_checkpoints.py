"""Tiny quantized checkpoints written by the tests themselves: a random transformers model's
linear weights quantized (GPTQ, AWQ, fp8 per-tensor / per-channel / block), saved as
safetensors + config.json with its `quantization_config`, and beside it a plain float32
checkpoint holding the same weights dequantized: the one transformers runs as the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from asyncllm.engine.quantization import int4_pack
from tests.tiny_models import build_tokenizer

LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
)  # fmt: skip  (w1/w2/w3: Mixtral's experts)
FP8 = torch.float8_e4m3fn


def build_base(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model wide enough for group sizes up to 128 (hidden 128, intermediate 256)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    common = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.bos_token_id,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _fp8(w: torch.Tensor, kind: str, block: tuple[int, int]) -> tuple[dict, torch.Tensor]:
    """(the stored tensors of one fp8 weight, its dequantized float32 value)."""
    fmax = torch.finfo(FP8).max
    if kind == "tensor":
        scale = w.abs().amax().clamp_min(1e-8) / fmax
        q = (w / scale).to(FP8)
        return {"weight": q, "weight_scale": scale.reshape(1)}, q.float() * scale
    if kind == "channel":
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / fmax
        q = (w / scale).to(FP8)
        return {"weight": q, "weight_scale": scale}, q.float() * scale
    bn, bk = block
    n, k = w.shape
    tiles = w.reshape(n // bn, bn, k // bk, bk)
    scale = tiles.abs().amax((1, 3)).clamp_min(1e-8) / fmax  # [n/bn, k/bk]
    q = (tiles / scale[:, None, :, None]).to(FP8)
    deq = (q.float() * scale[:, None, :, None]).reshape(n, k)
    return {"weight": q.reshape(n, k), "weight_scale_inv": scale}, deq


def _quant_config(fmt: str, opts: dict[str, Any]) -> dict[str, Any]:
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": opts.get("group_size", 32),
            "desc_act": opts.get("desc_act", False),
            "sym": opts.get("sym", True),
            "checkpoint_format": "gptq",
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": opts.get("group_size", 32),
            "zero_point": True,
            "version": "gemm",
        }
    if fmt in ("fp8-tensor", "fp8-channel"):
        group: dict[str, Any] = {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "strategy": fmt.split("-")[1],
                "dynamic": False,
                "symmetric": True,
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "dynamic": True,
                "symmetric": True,
            },
        }
        if opts.get("static_input"):
            group["input_activations"] = {
                "num_bits": 8,
                "type": "float",
                "strategy": "tensor",
                "dynamic": False,
                "symmetric": True,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": group},
            "ignore": ["lm_head"],
        }
    if fmt == "fp8-block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(opts.get("block", (32, 32))),
        }
    raise ValueError(fmt)


def quantize_checkpoint(src: Path, fmt: str, out: Path, **opts: Any) -> tuple[Path, Path]:
    """Write `out/quant` (format `fmt`) and `out/plain` (the same weights dequantized, float32)
    from the float checkpoint `src`. Returns (quant dir, plain dir)."""
    qdir, pdir = out / "quant", out / "plain"
    for d in (qdir, pdir):
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, d / f.name)
    gen = torch.Generator().manual_seed(opts.get("seed", 0))
    orders: dict[tuple[str, int], torch.Tensor] = {}  # one activation order per shared input
    quant: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, t in load_file(src / "model.safetensors").items():
        stem, _, suffix = name.rpartition(".")
        if suffix != "weight" or stem.rsplit(".", 1)[-1] not in LINEARS:
            quant[name] = plain[name] = t
            continue
        if fmt in ("gptq", "awq"):
            part = stem.rsplit(".", 1)[-1]
            shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
            key = (stem.rsplit(".", 1)[0] + "." + shared.get(part, part), t.shape[1])
            if opts.get("desc_act") and key not in orders:
                orders[key] = torch.randperm(t.shape[1], generator=gen)
            w = int4_pack.quantize_int4(
                t,
                opts.get("group_size", 32),
                sym=opts.get("sym", True) if fmt == "gptq" else False,
                desc_act=opts.get("desc_act", False),
                order=orders.get(key),
            )
            stored = int4_pack.to_gptq(w) if fmt == "gptq" else int4_pack.to_awq(w)
            deq = w.dequantize()
        else:
            stored, deq = _fp8(t.float(), fmt.split("-")[1], tuple(opts.get("block", (32, 32))))
            if opts.get("static_input"):
                stored["input_scale"] = torch.tensor([0.02])
        for key, value in stored.items():
            quant[f"{stem}.{key}"] = value.contiguous()
        plain[name] = deq.contiguous()
    save_file(quant, qdir / "model.safetensors")
    save_file(plain, pdir / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (pdir / "config.json").write_text(json.dumps(cfg, indent=1))
    cfg["quantization_config"] = _quant_config(fmt, opts)
    (qdir / "config.json").write_text(json.dumps(cfg, indent=1))
    return qdir, pdir
