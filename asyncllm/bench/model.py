"""The benchmark model: Qwen3-0.6B's shape with random bf16 weights, written once as a plain
Hugging Face directory (config, safetensors, a word-level tokenizer covering the whole vocabulary),
so asyncllm and transformers load the very same weights. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from asyncllm import envs

QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# Qwen3-8B's shape (the larger of the peer benchmark's two shapes): untied head.
QWEN3_8B = dict(
    QWEN3_0_6B,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B}
# transformers' own initialiser range. (0.05 made the residual stream so large that transformers'
# bf16 run drifted 0.34 nats per token from its own float32 run on the same weights.)
INIT_STD = 0.02
BENCH_ROOT = envs.bench_dir()
DEFAULT_DIR = BENCH_ROOT / f"qwen3-0.6b-random-std{INIT_STD}"


def shape_dir(shape: str) -> Path:
    """Where the random model of a named shape (SHAPES) is written."""
    return BENCH_ROOT / f"{shape}-random-std{INIT_STD}"


def _tokenizer(out: Path, vocab_size: int, eos_token_id: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=f"<t{eos_token_id}>", unk_token="<t0>"
    )
    fast.save_pretrained(out)


def build_model_dir(
    out: Path = DEFAULT_DIR, seed: int = 0, device: str | None = None, shape: dict = QWEN3_0_6B
) -> Path:
    """Write (once) and return a random model directory of `shape` (Qwen3-0.6B's by default)."""
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3Config(**shape)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, INIT_STD)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(out, cfg.vocab_size, shape["eos_token_id"])
    (out / "bench_model.json").write_text(json.dumps({"seed": seed, "init_std": INIT_STD}))
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def weight_bytes(cfg: dict = QWEN3_0_6B, dtype_bytes: int = 2) -> int:
    """Bytes of weights a decode step reads: every layer, and the (tied) embedding once as the
    head (the embedding lookup itself touches only a few rows)."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i + 2 * h + 2 * d
    return (cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * h + h) * dtype_bytes


def kv_bytes_per_token(cfg: dict = QWEN3_0_6B, dtype_bytes: int = 2) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes
