"""Qwen2-MoE: Qwen2's attention (q/k/v biases) with MoE blocks whose output adds a shared expert
behind a sigmoid gate; top-k weights renormalised only with `norm_topk_prob`; dense layers where
`mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from torch import nn

from asyncllm.engine.models.moe_common import MoeCausalLM, is_sparse_layer


class Qwen2MoeForCausalLM(MoeCausalLM):
    @staticmethod
    def attention_biases(hf_config: Any) -> tuple[bool, bool]:
        return bool(getattr(hf_config, "qkv_bias", True)), False

    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        if not is_sparse_layer(hf_config, layer_idx):
            return self.dense_mlp(hf_config, int(hf_config.intermediate_size), prefix)
        shared_size = int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
        return self.moe_block(
            hf_config,
            int(hf_config.num_experts),
            int(hf_config.moe_intermediate_size),
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
            prefix=prefix,
            shared_expert=(
                self.dense_mlp(hf_config, shared_size, f"{prefix}.shared_expert")
                if shared_size
                else None
            ),
        )
