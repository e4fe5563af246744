"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, explicit head_dim) with MoE blocks (no
shared expert; top-k weights renormalised with `norm_topk_prob`); dense layers where
`mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from torch import nn

from asyncllm.engine.models.moe_common import MoeCausalLM, is_sparse_layer


class Qwen3MoeForCausalLM(MoeCausalLM):
    qk_norm = True

    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        if not is_sparse_layer(hf_config, layer_idx):
            return self.dense_mlp(hf_config, int(hf_config.intermediate_size), prefix)
        return self.moe_block(
            hf_config,
            int(hf_config.num_experts),
            int(hf_config.moe_intermediate_size),
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
            prefix=prefix,
        )
