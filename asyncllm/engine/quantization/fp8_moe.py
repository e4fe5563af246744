"""fp8 checkpoints' MoE experts (layers/moe.py's `FusedMoEMethod` seam): per-tensor or
per-channel scales (compressed-tensors) and block scales (HF fp8), one tensor per expert
projection as such checkpoints store them (`experts.{e}.gate_proj.weight` fp8 beside its
`weight_scale` / `weight_scale_inv`).

The experts load as stored, fp8, and are dequantized once after loading to the model dtype;
then the dense expert method runs (the Triton fused-MoE kernels on CUDA, the grouped torch path
elsewhere). There is no fp8 fused-MoE kernel yet: on the GPU the experts take bf16 memory. A
float checkpoint quantized at load (`quantization="fp8"`) keeps its experts dense (rounding
them through fp8 would cost accuracy and save nothing without such a kernel)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.layers.linear import set_weight_attrs
from asyncllm.engine.layers.moe import FusedMoEMethod, UnquantizedFusedMoEMethod, _shard_ids

FP8 = torch.float8_e4m3fn


class Fp8MoEMethod(FusedMoEMethod):
    name = "fp8"

    def __init__(self, block: tuple[int, int] | None, block_param: str, static_input: bool):
        self.block = block
        self.block_param = block_param  # "weight_scale_inv" (HF fp8) or "weight_scale"
        self.static_input = static_input
        self._dense = UnquantizedFusedMoEMethod()

    def create_weights(self, layer, num_experts, hidden_size, inter, params_dtype) -> None:
        self.params_dtype = params_dtype
        w13 = torch.empty(num_experts, 2 * inter, hidden_size, dtype=FP8)
        w2 = torch.empty(num_experts, hidden_size, inter, dtype=FP8)
        layer.register_expert_param("w13_weight", nn.Parameter(w13, requires_grad=False), "w13")
        layer.register_expert_param("w2_weight", nn.Parameter(w2, requires_grad=False), "w2")
        if self.block is not None:
            bn, bk = self.block
            if inter % bn or hidden_size % bn or hidden_size % bk or inter % bk:
                raise ValueError(
                    f"{layer.prefix}: fp8 block size {list(self.block)} does not divide the "
                    f"experts' {inter} x {hidden_size}"
                )
            shapes = {
                "w13": (2 * inter // bn, hidden_size // bk),
                "w2": (hidden_size // bn, inter // bk),
            }
            suffix = self.block_param
        else:
            shapes = {"w13": (2 * inter, 1), "w2": (hidden_size, 1)}
            suffix = "weight_scale"
        for kind, shape in shapes.items():
            p = nn.Parameter(torch.empty(num_experts, *shape), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": self._scale_loader(layer, kind),
                                 "shard_ids": _shard_ids(kind, num_experts)})  # fmt: skip
            layer.register_parameter(f"{kind}_{suffix}", p)
            if self.static_input:
                i = nn.Parameter(torch.empty(1), requires_grad=False)
                set_weight_attrs(i, {"weight_loader": lambda *a, **k: None,
                                     "shard_ids": _shard_ids(kind, num_experts)})  # fmt: skip
                layer.register_parameter(f"{kind}_input_scale", i)

    def _scale_loader(self, layer: nn.Module, kind: str):
        """One expert projection's scale: per tensor (one number), per output row, or its
        blocks; placed at the shard's rows (gate first, then up, in w13)."""

        def load(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
            if shard_id is None:
                raise ValueError(f"{layer.prefix}: fp8 expert scales load one expert at a time")
            shard, expert = shard_id
            rows = param.shape[1] // (2 if kind == "w13" else 1)
            dest = param.data[expert].narrow(0, rows if shard == "w3" else 0, rows)
            loaded = loaded.float()
            if self.block is None and loaded.numel() == 1:
                loaded = loaded.reshape(1, 1).expand(rows, 1)
            loaded = loaded.reshape(dest.shape) if loaded.numel() == dest.numel() else loaded
            if loaded.shape != dest.shape:
                raise ValueError(
                    f"{layer.prefix}: expert scale of shape {tuple(loaded.shape)} does not fit "
                    f"{tuple(dest.shape)}"
                )
            dest.copy_(loaded)

        return load

    def _dequantize(self, w: Tensor, scale: Tensor) -> Tensor:
        if self.block is None:
            return w.float() * scale
        bn, bk = self.block
        return w.float() * scale.repeat_interleave(bn, 1).repeat_interleave(bk, 2)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        suffix = self.block_param if self.block is not None else "weight_scale"
        for kind in ("w13", "w2"):
            w = getattr(layer, f"{kind}_weight")
            dense = self._dequantize(w.data, getattr(layer, f"{kind}_{suffix}").data)
            for name in (f"{kind}_weight", f"{kind}_{suffix}", f"{kind}_input_scale"):
                if name in layer._parameters:
                    delattr(layer, name)
            p = nn.Parameter(dense.to(self.params_dtype), requires_grad=False)
            layer.register_parameter(f"{kind}_weight", p)

    def apply(self, layer, x, topk_weights, topk_ids):
        return self._dense.apply(layer, x, topk_weights, topk_ids)

    def describe(self, layer) -> str:
        return f"fp8 experts dequantized at load + {self._dense.describe(layer)}"
