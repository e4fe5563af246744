"""A GGUF file's quantized weights kept compact on the CPU (EngineArgs.cpu_weights="quantized").

`GGUFConfig` is built by the loader from the file's tensor table: a linear layer of ours whose
checkpoint tensors (all of a merged layer's parts) share one block type with a CPU kernel (Q4_0,
Q4_1, Q8_0) gets a `GGUFLinearMethod`: its `weight` parameter holds the file's raw blocks (uint8
[out, bytes per row]), loaded through the layers' usual loaders (rows are whole blocks, so shard
offsets along the output dimension carry over), then split into quants and scales
(asyncllm.engine.kernels.cpu_quant.GGUFWeight) and multiplied by the C kernel. Any other layer
gets None: the loader dequantizes its tensors to float32, as on the float32 path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from asyncllm.engine.kernels import cpu_quant
from asyncllm.engine.layers.linear import LinearMethod, QuantizationConfig, set_weight_attrs
from asyncllm.engine.quantization.base import checkpoint_names


class GGUFLinearMethod(LinearMethod):
    name = "gguf"

    def __init__(self, qtype: int):
        self.qtype = qtype

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        if input_size_per_partition % 32:
            raise ValueError(f"{layer.prefix}: {input_size_per_partition} inputs, not whole blocks")
        row_bytes = input_size_per_partition // 32 * cpu_quant.BLOCK_BYTES[self.qtype]
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), row_bytes, dtype=torch.uint8),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight", weight)
        layer.gguf_in_features = input_size_per_partition

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.gguf = cpu_quant.GGUFWeight.from_blocks(
            self.qtype, layer.weight.data, layer.gguf_in_features
        )
        del layer.weight  # the split copy replaces the raw blocks

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return cpu_quant.gguf_linear(x, layer.gguf, bias)

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        rows = cpu_quant.default_int8_rows()
        act = (
            f"int8 activations up to {rows} rows, float32 above" if rows else "float32 activations"
        )
        return f"gguf {cpu_quant.TYPE_NAMES[self.qtype]} (CPU C kernel, {act})"


class GGUFConfig(QuantizationConfig):
    """`types`: transformers' module name (e.g. model.layers.0.self_attn.q_proj) -> GGML type
    id of its weight, for every weight matrix in the file."""

    name = "gguf"

    def __init__(self, types: dict[str, int]):
        self.types = types

    def qtype_for(self, prefix: str) -> int | None:
        """The block type a layer of ours runs in, or None (float32 for it)."""
        kinds = {self.types.get(n) for n in checkpoint_names(prefix)}
        if len(kinds) != 1:
            return None  # parts in different types (or missing) cannot share one matmul
        (kind,) = kinds
        return kind if kind in cpu_quant.BLOCK_BYTES else None

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if prefix.endswith("lm_head"):
            return None  # the head is attached after loading (loader._gguf_head), tied or not
        kind = self.qtype_for(prefix)
        return None if kind is None else GGUFLinearMethod(kind)
