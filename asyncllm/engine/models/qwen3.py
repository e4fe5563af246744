"""Qwen3: the Llama network with an RMSNorm over each q and k head before RoPE, and an explicit
head_dim (not hidden_size / num_heads)."""

from __future__ import annotations

from asyncllm.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
