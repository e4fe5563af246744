"""Tiny random models of every supported architecture, built with transformers, with a trained
byte-level BPE tokenizer, saved as a Hugging Face directory. Tests compare against transformers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CORPUS = [
    "Hello world! The sky is blue and the grass is green.",
    "Once upon a time there was a little model that could generate text.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 😀 🚀 🎉 👍🏽 ❤️ 🇫🇷",
    "def f(x):\n    return x * 2  # code\n",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>?/\\|",
] * 20

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHITECTURES = (
    "llama",
    "llama3_scaled_untied",
    "llama_yarn",
    "mistral",
    "qwen2",
    "qwen2_window",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "phi3",
)
# Sliding windows shorter than the tests' prompts, so the window changes every output.
WINDOW = 5


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _config(arch: str, vocab_size: int, eos_id: int, bos_id: int):
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=bos_id,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0)
    if arch == "llama3_scaled_untied":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        _set_rope(cfg, rope)
        return cfg
    if arch == "llama_yarn":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
        _set_rope(
            cfg,
            {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        )
        return cfg
    if arch == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=WINDOW)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen2_window":
        # layer 0 full, layer 1 windowed (transformers: layers >= max_window_layers slide)
        return Qwen2Config(
            **common,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        )
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    # MoE: an odd expert count (Mixtral); a shared expert, no renormalisation (Qwen2-MoE); a dense
    # layer between two MoE ones and renormalised top-k (Qwen3-MoE)
    if arch == "mixtral":
        return MixtralConfig(
            **common, num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False
        )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        )
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3},
            head_dim=32,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            tie_word_embeddings=True,
        )
    if arch in ("gemma2", "gemma3"):
        gemma = dict(
            common,
            head_dim=16,
            query_pre_attn_scalar=24,  # not head_dim: the scale is its own setting
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
        if arch == "gemma2":
            from transformers import Gemma2Config

            # caps small enough to bite on a tiny random model (real ones: 50 and 30)
            return Gemma2Config(**gemma, attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(**gemma)
        cfg.rope_parameters = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
        }
        cfg.architectures = ["Gemma3ForCausalLM"]
        return cfg
    if arch in ("phi3", "phi3_longrope"):
        from transformers import Phi3Config

        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        extra = {}
        if arch == "phi3_longrope":
            # head_dim 16, half of it rotated: 4 frequencies, each with its own factor
            rope = dict(
                rope,
                rope_type="longrope",
                short_factor=[1.0, 1.3, 1.9, 2.6],
                long_factor=[1.1, 2.0, 4.5, 9.0],
            )
            extra = dict(original_max_position_embeddings=64, sliding_window=WINDOW)
        return Phi3Config(**common, **extra, tie_word_embeddings=False, rope_parameters=rope)
    raise ValueError(arch)


def _set_rope(cfg, rope: dict) -> None:
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = rope
    else:
        cfg.rope_scaling = rope
        cfg.rope_theta = rope["rope_theta"]


def build_model(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random `arch` model with its tokenizer to out_dir and return the path."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = _config(arch, len(tok), tok.eos_token_id, tok.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default weights make the logits peaked enough that greedy ties are rare.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif arch.startswith("gemma") and "norm" in name:
                p.normal_(0.0, 0.3)  # (1 + w) norms: w = 0 would hide a missing "1 +"
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_greedy(path: str | os.PathLike, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation: the reference every test compares against.

    Like the engine's `ignore_eos`, EOS neither stops nor is suppressed (`eos_token_id=[]`):
    `min_new_tokens` would mask EOS out of the logits, and a tiny model whose argmax is EOS
    would then continue differently from the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()
