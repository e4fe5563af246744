"""Phi-3: the Llama network with q/k/v and gate/up fused on disk (`qkv_proj`, `gate_up_proj`),
partial rotary (`partial_rotary_factor`), longrope ("su") scaling and an optional sliding window
on every layer; all of those but the fused names are config-driven in the shared layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

from asyncllm.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The checkpoint's fused tensors as transformers' Llama names: the loader stacks them
        back, and checks every shard is there and of the right shape."""
        attn0 = self.model.layers[0].self_attn
        q, kv = attn0.q_size, attn0.kv_size
        inter = int(self.config.intermediate_size)
        for name, tensor in weights:
            if ".qkv_proj." in name and tensor.shape[0] == q + 2 * kv:
                for part, start, size in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                    yield (
                        name.replace(".qkv_proj.", f".{part}_proj."),
                        tensor.narrow(0, start, size),
                    )
            elif ".gate_up_proj." in name and tensor.shape[0] == 2 * inter:
                yield name.replace(".gate_up_proj.", ".gate_proj."), tensor.narrow(0, 0, inter)
                yield name.replace(".gate_up_proj.", ".up_proj."), tensor.narrow(0, inter, inter)
            else:
                yield name, tensor
