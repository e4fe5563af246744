"""GPTQ and AWQ 4-bit checkpoints as linear methods (layouts: quantization/int4_pack.py).

Both load their checkpoint tensors as they are stored (through the layer's weight_loader:
packed and grouped dims are placed by proportion), then, once, after loading:
- on CUDA: repack into one layout for kernels/quant_gemm.int4_gemm (words along the input
  dim, fp16 scales and uint8 zero points per group); with GPTQ's activation order (desc_act)
  the inputs are sorted by group first and each call gathers x's columns in that order;
- elsewhere: dequantize to a dense float weight of the model dtype and run the dense method
  (on the CPU in float32: oneDNN-prepacked), so the CPU computes exactly the dequantized model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from asyncllm import envs
from asyncllm.engine.layers.linear import QuantizationConfig, set_weight_attrs
from asyncllm.engine.quantization import int4_pack
from asyncllm.engine.quantization.base import QuantizedLinearMethod, become_dense, is_skipped


def _param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, **attrs):
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, {"weight_loader": layer.weight_loader, **attrs})
    layer.register_parameter(name, p)
    return p


def _every_shard(layer: nn.Module) -> dict[str, Any]:
    """Attributes of a parameter that every shard of a merged layer loads in full."""
    ids = getattr(layer, "shard_ids", None)
    return {"shard_ids": list(ids)} if ids else {}


class _Int4Config(QuantizationConfig):
    method_cls: type

    def __init__(self, group_size: int, skip: list[str]):
        self.group_size = int(group_size)
        self.skip = skip

    def get_linear_method(self, layer: nn.Module, prefix: str) -> Any:
        if prefix == "lm_head" or is_skipped(prefix, self.skip):
            return None
        return self.method_cls(self)


def _check_bits(cfg: dict[str, Any], name: str) -> None:
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{name} checkpoints with {bits}-bit weights are not supported (4 only)")


class Int4LinearMethod(QuantizedLinearMethod):
    kernel_name = "Triton W4A16"
    stored = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, config: _Int4Config):
        self.config = config

    def group(self, k: int) -> int:
        gs = self.config.group_size
        gs = k if gs == -1 else gs
        if k % gs:
            raise ValueError(f"{k} input features are not a multiple of the group size {gs}")
        return gs

    def unpack(self, layer: nn.Module) -> int4_pack.Int4Weights:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = self.unpack(layer)
        stored = [n for n in self.stored if n in layer._parameters]
        if not self.uses_kernel(w.q.device):
            become_dense(layer, w.dequantize().to(layer.params_dtype), stored)
            return
        k = w.q.shape[0]
        gs = self.group(k)
        q, perm = w.q, None
        expected = torch.arange(k, device=q.device) // gs
        if not torch.equal(w.g_idx.long(), expected):
            # Activation order: sort the inputs by group; x is gathered the same way per call.
            perm = torch.argsort(w.g_idx.long(), stable=True)
            if not torch.equal(w.g_idx.long()[perm], expected):
                raise ValueError(f"{layer.prefix}: g_idx does not give every group {gs} inputs")
            q = q[perm]
        if w.zeros.max() > 255 or w.zeros.min() < 0:
            raise ValueError(f"{layer.prefix}: zero points out of range")
        for name in stored:
            delattr(layer, name)
        layer.register_buffer("w4_qweight", int4_pack.pack_rows(q).contiguous())
        layer.register_buffer("w4_scales", w.scales.to(torch.float16).contiguous())
        layer.register_buffer("w4_zeros", w.zeros.to(torch.uint8).contiguous())
        layer.register_buffer("w4_perm", perm)
        layer.w4_group = gs
        layer.w4_legacy = envs.quant_kernels() == "tile"  # the A/B switch, read once at load
        if q.device.type == "cuda":
            from asyncllm.engine.kernels import quant_gemv

            quant_gemv.reserve(q.device)  # before any CUDA graph is captured

    def uses_kernel(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def runs_dense(self, device: torch.device, dtype: torch.dtype) -> bool:
        return not self.uses_kernel(device)

    def apply_quantized(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        from asyncllm.engine.kernels.quant_gemm import int4_gemm

        if layer.w4_perm is not None:
            x = x.index_select(-1, layer.w4_perm)
        y = int4_gemm(x, layer.w4_qweight, layer.w4_scales, layer.w4_zeros, layer.w4_group,
                      legacy=getattr(layer, "w4_legacy", False))  # fmt: skip
        return y if bias is None else y + bias


# ---- GPTQ -------------------------------------------------------------------------------------
class GPTQLinearMethod(Int4LinearMethod):
    name = "gptq-int4"

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size,
        output_size, params_dtype,
    ) -> None:  # fmt: skip
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % 8 or any(s % 8 for s in output_partition_sizes):
            raise ValueError(f"{layer.prefix}: GPTQ needs sizes divisible by 8, got {k} x {n}")
        groups = k // self.group(k)
        packed = {"input_dim": 0, "output_dim": 1}
        _param(layer, "qweight", (k // 8, n), torch.int32, **packed)
        _param(layer, "qzeros", (groups, n // 8), torch.int32, **packed)
        _param(layer, "scales", (groups, n), torch.float16, **packed)
        # Every shard of a merged layer brings the same g_idx: each must arrive (shard_ids).
        g = _param(layer, "g_idx", (k,), torch.int32, input_dim=0, **_every_shard(layer))
        g.weight_loader = self._g_idx_loader(layer)

    @staticmethod
    def _g_idx_loader(layer: nn.Module):
        """Every shard of a merged layer brings its g_idx: GPTQ orders the inputs by the
        shared input's statistics, so they must agree."""
        seen: set[Any] = set()

        def load(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
            if loaded.shape != param.shape:
                raise ValueError(f"g_idx has shape {tuple(loaded.shape)}, expected {param.shape}")
            if seen and not torch.equal(param.data, loaded.to(param.device, param.dtype)):
                raise ValueError(f"{layer.prefix}: the merged projections' g_idx differ")
            param.data.copy_(loaded)
            seen.add(shard_id)

        return load

    def unpack(self, layer: nn.Module) -> int4_pack.Int4Weights:
        v1 = self.config.checkpoint_format != "gptq_v2"
        return int4_pack.from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, v1)


class GPTQConfig(_Int4Config):
    """`quant_method: "gptq"` (AutoGPTQ, gptqmodel, optimum): bits 4, group_size 32/64/128/-1,
    desc_act, sym; checkpoint_format "gptq" (zeros minus one) or "gptq_v2"."""

    name = "gptq"
    method_cls = GPTQLinearMethod

    def __init__(self, cfg: dict[str, Any]):
        _check_bits(cfg, "GPTQ")
        if cfg.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        if cfg.get("dynamic"):
            raise ValueError("GPTQ per-module `dynamic` overrides are not supported")
        super().__init__(cfg.get("group_size", 128), list(cfg.get("modules_to_not_convert") or []))
        self.desc_act = bool(cfg.get("desc_act", False))
        self.sym = bool(cfg.get("sym", True))
        self.checkpoint_format = cfg.get("checkpoint_format", "gptq")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported")


# ---- AWQ --------------------------------------------------------------------------------------
class AWQLinearMethod(Int4LinearMethod):
    name = "awq-int4"

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size,
        output_size, params_dtype,
    ) -> None:  # fmt: skip
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if any(s % 8 for s in output_partition_sizes):
            raise ValueError(f"{layer.prefix}: AWQ needs output sizes divisible by 8, got {n}")
        groups = k // self.group(k)
        packed = {"input_dim": 0, "output_dim": 1}
        _param(layer, "qweight", (k, n // 8), torch.int32, **packed)
        _param(layer, "qzeros", (groups, n // 8), torch.int32, **packed)
        _param(layer, "scales", (groups, n), torch.float16, **packed)

    def unpack(self, layer: nn.Module) -> int4_pack.Int4Weights:
        return int4_pack.from_awq(layer.qweight, layer.qzeros, layer.scales)


class AWQConfig(_Int4Config):
    """`quant_method: "awq"` (AutoAWQ), `version: "gemm"`, zero_point true, bits 4."""

    name = "awq"
    method_cls = AWQLinearMethod

    def __init__(self, cfg: dict[str, Any]):
        _check_bits(cfg, "AWQ")
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm only)")
        if not cfg.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported")
        group = cfg.get("group_size", cfg.get("q_group_size", 128))
        super().__init__(group, list(cfg.get("modules_to_not_convert") or []))
