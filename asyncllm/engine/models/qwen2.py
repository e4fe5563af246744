"""Qwen2: the Llama network with biases on q/k/v (never on o_proj)."""

from __future__ import annotations

from typing import Any

from asyncllm.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(hf_config: Any) -> tuple[bool, bool]:
        return True, False
