"""FP8 (e4m3) weights as linear methods: checkpoints with per-tensor or per-channel scales
(compressed-tensors "float-quantized", as published for Llama 3 / Qwen), with 2-D block scales
(HF `quant_method: "fp8"`, `weight_block_size`, `weight_scale_inv`: Qwen3-FP8, DeepSeek), and a
float checkpoint quantized per channel at load (`quantization="fp8"`).

Per-tensor scales are widened to per-channel at load (a merged q/k/v keeps each part's own
scale). What runs:
- CUDA with fp8 matmul (compute capability >= 8.9) in bfloat16: up to
  quant_gemv.FP8_GEMV_MAX_M rows (decode) the Triton W8A16 GEMV (fp8 weights dequantized in
  registers, no activation quantization); above, W8A8, x quantized per token on the fly,
  `torch._scaled_mm` with row-wise scales (float32 accumulation). Block scales: the Triton
  weight-only kernels (kernels/quant_gemm.fp8_block_gemm; fp8 stays fp8 in memory).
- CUDA with fp8 matmul in another dtype: the same Triton kernel with one block per row.
- Elsewhere (older GPUs, the CPU): the weights dequantized once to the model dtype, then the
  dense method (CPU float32: oneDNN-prepacked).
A checkpoint's static `input_scale` is loaded and not used: activations are always scaled per
token (at least as accurate as one static scale).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from asyncllm import envs
from asyncllm.engine.layers.linear import QuantizationConfig, set_weight_attrs
from asyncllm.engine.quantization.base import (
    QuantizedLinearMethod,
    become_dense,
    drop_params,
    fp8_matmul_supported,
    is_skipped,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def per_token_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1]): each row scaled to the e4m3 range."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """float [N, K] -> (fp8 [N, K], float32 scales [N, 1])."""
    return per_token_quant(w)


def _row_range(layer: nn.Module, shard_id: Any) -> int:
    """How many checkpoint rows (outputs) one loaded scale stands for."""
    full = getattr(layer, "_full", None)
    if shard_id is not None:
        return full[shard_id]
    if full is not None:
        return sum(full.values())
    return layer.output_size


class Fp8LinearMethod(QuantizedLinearMethod):
    """fp8 weight [N, K] with float32 scales: per output row (`block` None) or per
    (block_n x block_k) tile."""

    name = "fp8"

    def __init__(
        self,
        block: tuple[int, int] | None = None,
        *,
        online: bool = False,
        static_input: bool = False,
        block_param: str = "weight_scale_inv",
    ):
        self.block = block
        self.online = online  # a float checkpoint: the weight loads in the model dtype
        self.static_input = static_input  # the checkpoint has an input_scale per layer
        self.block_param = block_param  # compressed-tensors names block scales weight_scale

    # ---- parameters ----------------------------------------------------------------------
    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size,
        output_size, params_dtype,
    ) -> None:  # fmt: skip
        k, n = input_size_per_partition, sum(output_partition_sizes)
        w = nn.Parameter(
            torch.empty(n, k, dtype=params_dtype if self.online else FP8), requires_grad=False
        )
        set_weight_attrs(w, {"input_dim": 1, "output_dim": 0, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight", w)
        if self.online:
            return
        if self.block is not None:
            bn, bk = self.block
            if any(s % bn for s in output_partition_sizes) or k % bk:
                raise ValueError(
                    f"{layer.prefix}: fp8 block size {list(self.block)} does not divide the "
                    f"layer's parts {output_partition_sizes} x {k}"
                )
            s = nn.Parameter(torch.empty(n // bn, k // bk), requires_grad=False)
            set_weight_attrs(
                s, {"input_dim": 1, "output_dim": 0, "weight_loader": layer.weight_loader}
            )
            layer.register_parameter(self.block_param, s)
            return
        s = nn.Parameter(torch.empty(n, 1, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(s, {"output_dim": 0, "weight_loader": self._scale_loader(layer)})
        layer.register_parameter("weight_scale", s)
        if not self.static_input:
            return
        i = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
        ids = getattr(layer, "shard_ids", None)  # each shard brings its own: all must arrive
        set_weight_attrs(i, {"weight_loader": _ignore, **({"shard_ids": list(ids)} if ids else {})})
        layer.register_parameter("input_scale", i)

    @staticmethod
    def _scale_loader(layer: nn.Module):
        def load(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
            loaded = loaded.float()
            if loaded.numel() == 1:  # per tensor: one scale for every row of the part
                loaded = loaded.reshape(1, 1).expand(_row_range(layer, shard_id), 1)
            layer.weight_loader(param, loaded.reshape(-1, 1), shard_id)

        return load

    # ---- after loading -------------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight
        if self.online:
            q, scale = quantize_per_channel(w.data)
        else:
            q = w.data
            scale = getattr(layer, self.block_param if self.block else "weight_scale").data
        drop_params(layer, ("weight", "weight_scale", "weight_scale_inv", "input_scale"))
        dtype = layer.params_dtype
        if not self._kernel(q.device, dtype):
            become_dense(layer, self._dequantize(q, scale).to(dtype), ())
            return
        layer.fp8_legacy = envs.quant_kernels() == "tile"  # the A/B switch, read once at load
        if q.device.type == "cuda":
            from asyncllm.engine.kernels import quant_gemv

            quant_gemv.reserve(q.device)  # before any CUDA graph is captured
        layer.register_buffer("fp8_weight", q.contiguous())
        if self.block is None and self._kernel(q.device, dtype) == "scaled_mm":
            layer.register_buffer("fp8_scale", scale.reshape(1, -1).contiguous())
        else:
            layer.register_buffer("fp8_scale", scale.float().contiguous())

    def _dequantize(self, q: Tensor, scale: Tensor) -> Tensor:
        if self.block is None:
            return q.float() * scale.float()
        bn, bk = self.block
        s = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return q.float() * s[: q.shape[0], : q.shape[1]]

    def _kernel(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if not fp8_matmul_supported(device):
            return None
        if self.block is None and dtype == torch.bfloat16:
            return "scaled_mm"
        return "triton"

    def runs_dense(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self._kernel(device, dtype) is None

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        kind = "block" if self.block else "online per-channel" if self.online else "per-channel"
        path = self._kernel(device, dtype)
        if path is None:
            return f"fp8 {kind} (dequantized to {str(dtype).removeprefix('torch.')} at load)"
        if path == "scaled_mm":
            from asyncllm.engine.kernels.quant_gemv import FP8_GEMV_MAX_M

            if envs.quant_kernels() == "tile":
                return f"fp8 {kind} (W8A8 _scaled_mm)"
            return f"fp8 {kind} (Triton W8A16 GEMV to {FP8_GEMV_MAX_M} rows, W8A8 _scaled_mm above)"
        return f"fp8 {kind} (Triton W8A16)"

    def apply_quantized(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        from asyncllm.engine.kernels import quant_gemv
        from asyncllm.engine.kernels.fp8_quant import per_token_fp8
        from asyncllm.engine.kernels.quant_gemm import fp8_block_gemm

        w, s = layer.fp8_weight, layer.fp8_scale
        legacy = getattr(layer, "fp8_legacy", False)
        if self.block is not None:
            y = fp8_block_gemm(x, w, s, self.block, legacy=legacy)
        elif s.shape[0] == 1:  # [1, N]: the _scaled_mm layout
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if not legacy and 0 < x2.shape[0] <= quant_gemv.FP8_GEMV_MAX_M:
                # W8A16 GEMV: at a few rows the activation quantization kernel and
                # _scaled_mm cost more than the weight read (H200: 5.16 ms/token vs bf16 4.85)
                y = quant_gemv.fp8_gemv(x2, w, s, None)
            else:
                xq, xs = per_token_fp8(x2)
                y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=x.dtype)
            y = y.reshape(*shape[:-1], w.shape[0])
        else:  # [N, 1]: one block per row
            y = fp8_block_gemm(x, w, s, (1, w.shape[1]), legacy=legacy)
        return y if bias is None else y + bias


def _ignore(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
    """A static activation scale: per-token scales are computed instead."""


class CompressedTensorsFp8Config(QuantizationConfig):
    """`quant_method: "compressed-tensors"` with 8-bit float weights (format "float-quantized"
    or "naive-quantized"), strategy "tensor", "channel" or "block"."""

    name = "compressed-tensors-fp8"

    def __init__(self, cfg: dict[str, Any]):
        if cfg.get("kv_cache_scheme"):
            raise ValueError("compressed-tensors fp8 KV cache scales are not supported")
        groups = cfg.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(
                f"compressed-tensors: {len(groups)} config groups; one fp8 group is supported"
            )
        (group,) = groups.values()
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
            raise ValueError(
                "compressed-tensors: only 8-bit float weights are supported, got "
                f"{weights.get('type')} {weights.get('num_bits')}-bit"
            )
        fmt = cfg.get("format", "float-quantized")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported")
        targets = group.get("targets") or ["Linear"]
        if targets != ["Linear"]:
            raise ValueError(f"compressed-tensors targets {targets} are not supported")
        strategy = weights.get("strategy", "tensor")
        self.block: tuple[int, int] | None = None
        if strategy == "block":
            self.block = tuple(weights.get("block_structure") or (128, 128))  # type: ignore
        elif strategy not in ("tensor", "channel"):
            raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported")
        self.ignore = list(cfg.get("ignore") or [])
        acts = group.get("input_activations") or {}
        self.static_input = bool(acts) and not acts.get("dynamic", True)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> Any:
        if is_skipped(prefix, self.ignore):
            return None
        if prefix == "lm_head":
            return None  # a head listed in no ignore list is still never quantized on disk
        return Fp8LinearMethod(
            self.block, static_input=self.static_input, block_param="weight_scale"
        )

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Any:
        from asyncllm.engine.quantization.fp8_moe import Fp8MoEMethod

        if is_skipped(prefix, self.ignore):
            return None
        return Fp8MoEMethod(self.block, "weight_scale", self.static_input)


class Fp8Config(QuantizationConfig):
    """HF `quant_method: "fp8"`: `weight_block_size` [bn, bk] with `weight_scale_inv`
    (dynamic activations), `modules_to_not_convert`; or no checkpoint scales at all
    (`online`: EngineArgs.quantization="fp8" on a float checkpoint)."""

    name = "fp8"

    def __init__(self, cfg: dict[str, Any] | None = None, online: bool = False):
        cfg = cfg or {}
        self.online = online
        block = cfg.get("weight_block_size")
        if not online and not block:
            raise ValueError("fp8 checkpoints without weight_block_size are not supported")
        self.block = None if online else (int(block[0]), int(block[1]))
        if cfg.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError("fp8 checkpoints with static activation scales are not supported")
        self.skip = list(cfg.get("modules_to_not_convert") or [])

    def get_linear_method(self, layer: nn.Module, prefix: str) -> Any:
        if prefix == "lm_head" or is_skipped(prefix, self.skip):
            return None
        return Fp8LinearMethod(self.block, online=self.online)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Any:
        from asyncllm.engine.quantization.fp8_moe import Fp8MoEMethod

        if self.online or is_skipped(prefix, self.skip):
            return None  # quantized at load: the experts stay dense (fp8_moe.py says why)
        return Fp8MoEMethod(self.block, "weight_scale_inv", static_input=False)
