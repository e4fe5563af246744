"""What every quantized linear method shares: which checkpoint layers a merged layer of ours
stands for (to match a format's ignore lists), the dense fallback (a quantized weight
dequantized once at load, then run as the dense float method), and the device checks."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from asyncllm.engine.layers.linear import LinearMethod, UnquantizedLinearMethod

# Our merged projections -> transformers' separate ones (what checkpoints and ignore lists name).
_MERGED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_names(prefix: str) -> list[str]:
    """The checkpoint's module names behind one of our layers: a merged layer is several."""
    stem, _, last = prefix.rpartition(".")
    parts = _MERGED_PARTS.get(last)
    if parts is None:
        return [prefix]
    return [f"{stem}.{p}" if stem else p for p in parts]


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    # A plain entry names a module, or a suffix of one ("lm_head", "down_proj", "layers.0.mlp").
    return name == pattern or name.endswith("." + pattern) or f".{pattern}." in f".{name}."


def is_skipped(prefix: str, patterns: Iterable[str]) -> bool:
    """True when the format leaves this layer unquantized. A merged layer must be all in or all
    out: half-quantized q/k/v cannot share one matmul."""
    patterns = list(patterns)
    if not patterns:
        return False
    hits = [any(_matches(n, p) for p in patterns) for n in checkpoint_names(prefix)]
    if any(hits) and not all(hits):
        raise ValueError(
            f"{prefix}: the checkpoint quantizes only some of {checkpoint_names(prefix)}; "
            "a merged layer must be quantized as a whole"
        )
    return all(hits)


def fp8_matmul_supported(device: torch.device) -> bool:
    """torch._scaled_mm with e4m3 operands: Ada (8.9) and Hopper (9.0) or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def drop_params(layer: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        if name in layer._parameters:
            delattr(layer, name)


def become_dense(layer: nn.Module, weight: Tensor, drop: Iterable[str]) -> None:
    """Replace a layer's quantized parameters by a dense float weight [out, in] and let the
    dense method set itself up (on the CPU in float32: the oneDNN prepack)."""
    drop_params(layer, drop)
    layer.register_parameter("weight", nn.Parameter(weight.contiguous(), requires_grad=False))
    layer._dense = UnquantizedLinearMethod()
    layer._dense.process_weights_after_loading(layer)


class QuantizedLinearMethod(LinearMethod):
    """A quantized method that may have become dense at load (`layer._dense`): CPU, or a GPU
    without the format's kernel. Subclasses implement `apply_quantized`."""

    dense_note = ""

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        dense = getattr(layer, "_dense", None)
        if dense is not None:
            return dense.apply(layer, x, bias)
        return self.apply_quantized(layer, x, bias)

    def apply_quantized(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def runs_dense(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this method dequantizes at load on this device and dtype."""
        return device.type != "cuda"

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.runs_dense(device, dtype):
            return f"{self.name} (dequantized to {str(dtype).removeprefix('torch.')} at load)"
        return f"{self.name} ({self.kernel_name})"

    kernel_name = "kernel"
