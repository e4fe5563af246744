"""Mixtral: the Llama network with a sparse MoE block in every layer (softmax over the experts,
top-k, renormalised; no shared expert)."""

from __future__ import annotations

from typing import Any

from torch import nn

from asyncllm.engine.models.moe_common import MoeCausalLM


class MixtralForCausalLM(MoeCausalLM):
    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        return self.moe_block(
            hf_config,
            int(hf_config.num_local_experts),
            int(hf_config.intermediate_size),
            renormalize=True,
            prefix=prefix,
        )
