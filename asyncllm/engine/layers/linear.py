"""Linear layers whose weights and matmul come from a *linear method*.

A layer (replicated, column- or row-parallel) knows its shape and how it is split across the
tensor-parallel ranks; its `linear_method` creates its parameters, post-processes them once after
loading, and computes `apply(x)`. The dense float method is `UnquantizedLinearMethod` (on the CPU
in float32 it prepacks the weight for oneDNN, layers/cpu_linear.py); a quantized checkpoint
format plugs in as a `QuantizationConfig` handing out its own methods, and models never branch
on a format (docs/INTERFACES.md, "Linear layers").

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`: it narrows the
checkpoint tensor to this rank's part and copies it to its offset. Merged layers (gate/up,
q/k/v) take one shard per call by shard id; a tensor fused on disk (shard_id None) is split into
its shards here. Parameters say which dims are split with `output_dim` / `input_dim`; a method's
parameter whose split dim is packed or grouped is handled by proportion (its length along the dim
over the logical length), so quantized layouts load through the same loaders.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asyncllm.engine import distributed
from asyncllm.engine.layers import cpu_linear


def set_weight_attrs(param: Tensor, attrs: dict[str, Any] | None) -> None:
    """Attach loading metadata (`weight_loader`, `output_dim`, `input_dim`, ...) to a parameter."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def _copy(dest: Tensor, src: Tensor, what: str) -> None:
    if dest.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor for {what} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(src)


class LinearMethod:
    """How a linear layer stores and applies its weights."""

    name = "base"

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Once, after every weight is loaded (repack, transpose, prepack, scales...)."""

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        """What runs, for the start-up line (asyncllm.engine.kernel_paths)."""
        return self.name


class QuantizationConfig:
    """One per checkpoint format; `None` in its place means dense float."""

    name = "base"

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for one layer; None: dense float for this layer."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """Dense float `y = x W^T + b`, W stored [out, in] as transformers stores it. On the CPU in
    float32 (with oneDNN), the weight is prepacked once after loading and the dense copy dropped
    (kept where the parameter is shared: a tied vocabulary projection's embedding)."""

    name = "dense"

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(
            weight, {"input_dim": 1, "output_dim": 0, "weight_loader": layer.weight_loader}
        )
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        if not cpu_linear.prepack_usable(weight.device, weight.dtype):
            return
        bias = getattr(layer, "packed_bias", lambda: getattr(layer, "bias", None))()
        layer.packed = cpu_linear.PackedLinear(weight, bias)
        if "weight" in layer._parameters:  # its own: the packed copy replaces it
            del layer.weight

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        packed = getattr(layer, "packed", None)
        if packed is not None:
            return packed(x)  # the bias, if any, was packed with the weight
        return F.linear(x, layer.weight, bias)

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        if cpu_linear.prepack_usable(device, dtype):
            return "dense (oneDNN prepacked)"
        return "dense"


def method_for(
    layer: nn.Module, quant_config: QuantizationConfig | None, prefix: str
) -> LinearMethod:
    method = None if quant_config is None else quant_config.get_linear_method(layer, prefix)
    return method if method is not None else UnquantizedLinearMethod()


class LinearBase(nn.Module):
    """A linear layer: shape and split here, parameters and matmul in `self.linear_method`."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        self.tp_rank = distributed.get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = distributed.get_tp_size() if tp_size is None else tp_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_config = quant_config
        self.linear_method = method_for(self, quant_config, prefix)

    def _split(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(
                f"{self.prefix}: {what} {size} is not divisible by tp_size {self.tp_size}"
            )
        return size // self.tp_size

    def _make_bias(self, size: int, output_dim: int | None) -> None:
        b = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
        attrs: dict[str, Any] = {"weight_loader": self.weight_loader}
        if output_dim is not None:
            attrs["output_dim"] = output_dim
        set_weight_attrs(b, attrs)
        self.register_parameter("bias", b)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{self.prefix} has no shards (got shard id {shard_id!r})")
        _copy(param.data, loaded, self.prefix)

    def packed_bias(self) -> Tensor | None:
        """The bias `forward` hands to `apply` (what a method may fold into a packed weight)."""
        return self.bias

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, method={self.linear_method.name}"


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw: Any):
        super().__init__(input_size, output_size, bias, **kw)
        self.linear_method.create_weights(
            self, input_size, [output_size], input_size, output_size, self.params_dtype
        )
        if bias:
            self._make_bias(output_size, None)
        else:
            self.register_parameter("bias", None)


class ColumnParallelLinear(LinearBase):
    """The output dim split across ranks; with gather_output the full output is gathered."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        output_partition_sizes: list[int] | None = None,
        **kw: Any,
    ):
        super().__init__(input_size, output_size, bias, **kw)
        self.gather_output = gather_output
        sizes = output_partition_sizes or [self._split(output_size, "output size")]
        self.output_partition_sizes = sizes
        self.output_size_per_partition = sum(sizes)
        self.linear_method.create_weights(
            self, input_size, sizes, input_size, output_size, self.params_dtype
        )
        if bias:
            self._make_bias(self.output_size_per_partition, 0)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        _load_unsharded_layer(self, param, loaded, shard_id, "output_dim", "rows")

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear_method.apply(self, x, self.bias)
        if self.gather_output and self.tp_size > 1:
            out = distributed.tensor_model_parallel_all_gather(out, dim=-1)
        return out


class _ShardedColumn(ColumnParallelLinear):
    """A column-parallel layer made of named sub-outputs stacked on the output dim.

    `_shards[id] = (offset, size, index, parts)` in logical units of this rank's output: where the
    shard sits, how long it is here, which of the checkpoint tensor's `parts` equal slices is
    this rank's, and `_full[id]` its length in the checkpoint."""

    _shards: dict[Any, tuple[int, int, int, int]]
    _full: dict[Any, int]

    @property
    def shard_ids(self) -> list[Any]:
        return list(self._shards)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None:
            if dim is None:
                _copy(param.data, loaded, self.prefix)
                return
            # Fused on disk (e.g. Phi-3's qkv_proj): split it into its shards, load each.
            total = sum(self._full.values())
            if loaded.shape[dim] % total:
                raise ValueError(
                    f"fused checkpoint tensor for {self.prefix} has {loaded.shape[dim]} rows on "
                    f"dim {dim}, not a multiple of {total}"
                )
            unit = loaded.shape[dim] // total
            pieces = loaded.split([self._full[s] * unit for s in self._shards], dim)
            for sid, piece in zip(self._shards, pieces, strict=True):
                self.weight_loader(param, piece, sid)
            return
        if shard_id not in self._shards:
            raise ValueError(f"{self.prefix}: unknown shard id {shard_id!r}; have {self.shard_ids}")
        if dim is None:
            raise ValueError(
                f"{self.prefix}: parameter has no output_dim, so it cannot be loaded by shard; "
                "its method must give it its own weight_loader"
            )
        offset, size, index, parts = self._shards[shard_id]
        logical = self.output_size_per_partition
        p_off = offset * param.shape[dim] // logical
        p_size = size * param.shape[dim] // logical
        if loaded.shape[dim] != p_size * parts:
            raise ValueError(
                f"checkpoint tensor for {self.prefix} shard {shard_id!r} has {loaded.shape[dim]} "
                f"rows on dim {dim}, expected {p_size * parts}"
            )
        dest = param.data.narrow(dim, p_off, p_size)
        _copy(dest, loaded.narrow(dim, index * p_size, p_size), f"{self.prefix}:{shard_id}")


class MergedColumnParallelLinear(_ShardedColumn):
    """Several column-parallel outputs in one matmul (gate/up: output_sizes=[inter, inter]);
    shard ids 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, **kw: Any):
        tp_size = distributed.get_tp_size() if kw.get("tp_size") is None else kw["tp_size"]
        tp_rank = distributed.get_tp_rank() if kw.get("tp_rank") is None else kw["tp_rank"]
        if any(s % tp_size for s in output_sizes):
            raise ValueError(f"output sizes {output_sizes} are not divisible by tp_size {tp_size}")
        per = [s // tp_size for s in output_sizes]
        self.output_sizes = list(output_sizes)
        self._shards = {
            i: (sum(per[:i]), per[i], tp_rank, tp_size) for i in range(len(output_sizes))
        }
        self._full = dict(enumerate(output_sizes))
        super().__init__(input_size, sum(output_sizes), bias, output_partition_sizes=per, **kw)


class QKVParallelLinear(_ShardedColumn):
    """q, k and v in one matmul; shard ids "q", "k", "v". Heads split across ranks; with fewer
    KV heads than ranks each KV head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        **kw: Any,
    ):
        tp_size = distributed.get_tp_size() if kw.get("tp_size") is None else kw["tp_size"]
        tp_rank = distributed.get_tp_rank() if kw.get("tp_rank") is None else kw["tp_rank"]
        kv_total = total_num_kv_heads or total_num_heads
        if total_num_heads % tp_size:
            raise ValueError(f"{total_num_heads} heads are not divisible by tp_size {tp_size}")
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, kv_total
        self.num_heads = total_num_heads // tp_size
        if tp_size >= kv_total:
            if tp_size % kv_total:
                raise ValueError(f"tp_size {tp_size} is not a multiple of {kv_total} KV heads")
            self.num_kv_heads, replicas = 1, tp_size // kv_total
        else:
            if kv_total % tp_size:
                raise ValueError(f"{kv_total} KV heads are not divisible by tp_size {tp_size}")
            self.num_kv_heads, replicas = kv_total // tp_size, 1
        q, kv = self.num_heads * head_size, self.num_kv_heads * head_size
        kv_parts = kv_total // self.num_kv_heads
        self._shards = {
            "q": (0, q, tp_rank, tp_size),
            "k": (q, kv, tp_rank // replicas, kv_parts),
            "v": (q + kv, kv, tp_rank // replicas, kv_parts),
        }
        self._full = {
            "q": total_num_heads * head_size,
            "k": kv_total * head_size,
            "v": kv_total * head_size,
        }
        out = (total_num_heads + 2 * kv_total) * head_size
        super().__init__(hidden_size, out, bias, output_partition_sizes=[q, kv, kv], **kw)


class RowParallelLinear(LinearBase):
    """The input dim split across ranks; with reduce_results the partial outputs are summed
    (engine/distributed.py; the identity at tp_size 1). The bias is added once, on rank 0."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        **kw: Any,
    ):
        super().__init__(input_size, output_size, bias, **kw)
        self.reduce_results = reduce_results
        self.input_size_per_partition = self._split(input_size, "input size")
        self.linear_method.create_weights(
            self,
            self.input_size_per_partition,
            [output_size],
            input_size,
            output_size,
            self.params_dtype,
        )
        if bias:
            self._make_bias(output_size, None)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        _load_unsharded_layer(self, param, loaded, shard_id, "input_dim", "columns")

    def packed_bias(self) -> Tensor | None:
        return self.bias if self.tp_rank == 0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear_method.apply(self, x, self.packed_bias())
        if self.reduce_results and self.tp_size > 1:
            out = distributed.tensor_model_parallel_all_reduce(out)
        return out


def _load_unsharded_layer(
    layer: Any, param: Tensor, loaded: Tensor, shard_id: Any, dim_attr: str, word: str
) -> None:
    """A whole checkpoint tensor into a layer without shards (column- or row-parallel): this
    rank's slice along the parameter's `dim_attr` dimension, if it has one."""
    if shard_id is not None:
        raise ValueError(f"{layer.prefix} has no shards (got shard id {shard_id!r})")
    dim = getattr(param, dim_attr, None)
    if dim is not None:
        size = param.shape[dim]
        if loaded.shape[dim] != size * layer.tp_size:
            raise ValueError(
                f"checkpoint tensor for {layer.prefix} has {loaded.shape[dim]} {word} on dim "
                f"{dim}, expected {size * layer.tp_size}"
            )
        loaded = loaded.narrow(dim, layer.tp_rank * size, size)
    _copy(param.data, loaded, layer.prefix)
