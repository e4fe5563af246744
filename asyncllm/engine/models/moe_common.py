"""The Llama-family decoder with a mixture-of-experts block as the MLP of its sparse layers
(Mixtral, Qwen2-MoE, Qwen3-MoE): which layers are sparse, the block `make_mlp` builds there, and
the names of transformers' checkpoints (experts one tensor each or fused per layer, Mixtral's
`block_sparse_moe`) mapped onto the stacked expert parameters."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.layers.moe import SparseMoeBlock, expert_weight_target
from asyncllm.engine.models.llama import _STACKED, MLP, LlamaForCausalLM
from asyncllm.engine.models.weights import load_weights


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule (transformers' decoder layer): an MoE block unless the layer is listed in
    `mlp_only_layers`, and then only every `decoder_sparse_step`-th layer."""
    if layer_idx in (getattr(hf_config, "mlp_only_layers", None) or []):
        return False
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return int(getattr(hf_config, "num_experts", 0) or 0) > 0 and (layer_idx + 1) % step == 0


def _remap(name: str) -> tuple[str, Any] | None:
    renamed = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name
    target = expert_weight_target(renamed)
    if target is not None:
        return target
    return (renamed, None) if renamed != name else None


class MoeCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose `make_mlp` gives sparse layers an MoE block (subclasses say which
    layers and with what), built through the same factories and kernel paths."""

    def dense_mlp(self, hf_config: Any, intermediate_size: int, prefix: str) -> MLP:
        """The gated MLP at a given intermediate size (dense layers, shared experts)."""
        cfg = copy.copy(hf_config)
        cfg.intermediate_size = intermediate_size
        return MLP(cfg, prefix, ops=self.kernels.fused, quant_config=self.quant_config)

    def moe_block(
        self,
        hf_config: Any,
        num_experts: int,
        intermediate_size: int,
        renormalize: bool,
        prefix: str,
        shared_expert: nn.Module | None = None,
    ) -> SparseMoeBlock:
        k = self.kernels
        return SparseMoeBlock(
            hf_config.hidden_size,
            num_experts,
            int(hf_config.num_experts_per_tok),
            intermediate_size,
            renormalize,
            shared_expert=shared_expert,
            shared_expert_gate=shared_expert is not None,
            quant_config=self.quant_config,
            prefix=prefix,
            use_triton=k.fused_moe,
        )

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """As LlamaForCausalLM's, plus the experts: per expert (`experts.{e}.gate_proj`, ...,
        Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`) or fused (`experts.gate_up_proj`,
        `experts.down_proj`) into the stacked parameters; every expert must arrive."""

        def skip(name: str) -> bool:
            return "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head.tied)

        load_weights(self, weights, _STACKED, skip, remap=_remap)
