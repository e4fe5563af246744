"""The Llama-family decoder with a mixture-of-experts block as the MLP of its sparse layers
(Mixtral, Qwen2-MoE, Qwen3-MoE): which layers are sparse, the block each builds, and loading
transformers' checkpoint names (experts one tensor each or fused per layer) into the stacked
expert parameters."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.layers.attention import AttentionBackend
from asyncllm.engine.layers.moe import FusedMoE, SparseMoeBlock, expert_weight_target
from asyncllm.engine.models.llama import MLP, LlamaForCausalLM


def dense_mlp(hf_config: Any, intermediate_size: int) -> MLP:
    """The gated MLP at a given intermediate size (dense layers, shared experts)."""
    cfg = copy.copy(hf_config)
    cfg.intermediate_size = intermediate_size
    return MLP(cfg)


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule (transformers' decoder layer): an MoE block unless the layer is listed in
    `mlp_only_layers`, and then only every `decoder_sparse_step`-th layer."""
    if layer_idx in (getattr(hf_config, "mlp_only_layers", None) or []):
        return False
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return int(getattr(hf_config, "num_experts", 0) or 0) > 0 and (layer_idx + 1) % step == 0


# our fused q/k/v and gate/up parameters <- transformers' separate projections
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class MoeCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose layers take their MLP from `make_mlp`."""

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend):
        super().__init__(hf_config, attn_backend)
        for i, layer in enumerate(self.model.layers):
            # built on the meta device by the loader: the replaced dense MLP cost nothing
            layer.mlp = self.make_mlp(hf_config, i, f"model.layers.{i}.mlp")

    def make_mlp(self, hf_config: Any, layer_idx: int, prefix: str) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def moe_block(
        hf_config: Any,
        num_experts: int,
        intermediate_size: int,
        renormalize: bool,
        prefix: str,
        shared_expert: nn.Module | None = None,
    ) -> SparseMoeBlock:
        return SparseMoeBlock(
            hf_config.hidden_size,
            num_experts,
            int(hf_config.num_experts_per_tok),
            intermediate_size,
            renormalize,
            shared_expert=shared_expert,
            shared_expert_gate=shared_expert is not None,
            prefix=prefix,
        )

    def _stacked_dest(self, name: str, param: Tensor, shard: str | int) -> Tensor:
        if shard in (0, 1):  # gate / up halves of this MLP's own size
            half = param.shape[0] // 2
            return param.narrow(0, shard * half, half)
        attn = self.model.layers[0].self_attn
        q, kv = attn.q_size, attn.kv_size
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        return param.narrow(0, start, size)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """transformers' names: q/k/v and gate/up into the fused parameters, experts (one tensor
        each, Mixtral's w1/w3/w2 under `block_sparse_moe`, or fused per layer) into the stacked
        ones. Every parameter and every expert must be loaded."""
        params = dict(self.named_parameters())
        moes = {n: m for n, m in self.named_modules() if isinstance(m, FusedMoE)}
        loaded: set[Any] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            name = name.replace(".block_sparse_moe.", ".mlp.")
            expert = expert_weight_target(name)
            if expert is not None:
                target, expert_id, shard = expert
                module_name, _, pname = target.rpartition(".")
                moe = moes.get(module_name)
                if moe is None:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                    )
                moe.load_weight(pname, tensor, shard, expert_id)
                loaded |= {(module_name, *u) for u in moe.loaded_units(pname, shard, expert_id)}
                continue
            target, shard = name, None
            for hf_part, (ours, shard_id) in _STACKED.items():
                if f".{hf_part}." in name:
                    target, shard = name.replace(f".{hf_part}.", f".{ours}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                )
            dest = param if shard is None else self._stacked_dest(target, param, shard)
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(target if shard is None else f"{target}:{shard}")
        expected: set[Any] = set()
        for module_name, moe in moes.items():
            expected |= {(module_name, *u) for u in moe.expected_loads()}
        for pname in params:
            module_name = pname.rpartition(".")[0]
            if module_name in moes:
                continue
            if module_name.endswith("qkv_proj"):
                expected |= {f"{pname}:{s}" for s in ("q", "k", "v")}
            elif module_name.endswith("gate_up_proj"):
                expected |= {f"{pname}:{s}" for s in (0, 1)}
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            shown = sorted(str(m) for m in missing)[:5]
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {shown}")
