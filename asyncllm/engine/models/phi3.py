"""Phi-3: the Llama network with q/k/v and gate/up fused on disk (`qkv_proj`, `gate_up_proj`:
they match our merged layers' names and load whole, shard id None), partial rotary
(`partial_rotary_factor`), longrope ("su") scaling and an optional sliding window on every
layer. All of it is config-driven in the shared parts; the class exists for the name."""

from __future__ import annotations

from asyncllm.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
