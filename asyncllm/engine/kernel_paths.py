"""The kernel paths of one engine, chosen once at start-up for its device and dtype.

Which attention backend, which fused elementwise ops (Triton on CUDA, C on the CPU in float32,
the layers' torch ops otherwise), whether the CPU decode attention kernel runs, which linear
method, CUDA graphs on or off. The model gets the choice at construction (layers hold the ops
they were given; nothing dispatches per call), and the engine logs it in one line. The
environment switches (asyncllm.envs) are read here and nowhere later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from asyncllm import envs

logger = logging.getLogger(__name__)


@dataclass
class KernelPaths:
    device: torch.device
    dtype: torch.dtype
    attention: Any  # AttentionBackend
    fused: ModuleType | None  # kernels.fused or kernels.cpu_fused (same functions), or None
    cpu_decode_attention: bool  # the paged C decode kernel (torch backend, CPU float32)
    cuda_graphs: bool = False
    fused_moe: bool = False  # MoE layers through the Triton fused-MoE kernels (kernels.fused_moe)

    @property
    def fused_name(self) -> str:
        if self.fused is None:
            return "torch"
        return "c" if self.fused.__name__.endswith("cpu_fused") else "triton"

    def describe(self, linear: str = "dense", moe: str | None = None) -> str:
        """The one start-up line (`moe`: the experts' methods, for a model that has some)."""
        return (
            f"kernel paths on {self.device} {str(self.dtype).removeprefix('torch.')}: "
            f"attention={self.attention.name}, fused ops={self.fused_name}, "
            f"CPU decode attention={'c' if self.cpu_decode_attention else 'torch'}, "
            f"linear={linear}, "
            + (f"moe={moe}, " if moe else "")
            + f"CUDA graphs={'on' if self.cuda_graphs else 'off'}"
        )


def select_fused_ops(device: torch.device | str, dtype: torch.dtype) -> ModuleType | None:
    """The fused-op module for a model on this device in this dtype: kernels.fused on CUDA when
    triton imports (`ASYNCLLM_FUSED=0`: none), kernels.cpu_fused for float32 on the CPU when its
    library builds (`ASYNCLLM_CPU_FUSED=0`: none), else None (the layers' torch ops)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not envs.fused():
            return None
        try:
            from asyncllm.engine.kernels import fused
        except ImportError:
            return None
        return fused
    if device.type == "cpu" and dtype == torch.float32:
        from asyncllm.engine.kernels import cpu_fused

        if cpu_fused.available(torch.empty(0, dtype=dtype)):
            return cpu_fused
    return None


def select_cpu_decode_attention(device: torch.device | str, dtype: torch.dtype) -> bool:
    """The paged C decode kernel: float32 on the CPU, not switched off
    (`ASYNCLLM_CPU_ATTENTION=torch`), and its library builds."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    from asyncllm.engine.kernels import cpu_decode_attention

    return cpu_decode_attention.enabled() and cpu_decode_attention.load() is not None


def select_fused_moe(device: torch.device | str, fused: ModuleType | None) -> bool:
    """The Triton fused-MoE kernels: on CUDA wherever the Triton fused ops were chosen (triton
    imports, `ASYNCLLM_FUSED` not `0`); else MoE layers group tokens by expert in torch ops."""
    if torch.device(device).type != "cuda" or fused is None:
        return False
    try:
        from asyncllm.engine.kernels import fused_moe  # noqa: F401
    except ImportError:
        return False
    return True


def select_cuda_attention_kernels(device: torch.device | str) -> tuple[str, str]:
    """The (decode, prefill) kernels of the triton backend from ASYNCLLM_DECODE_ATTENTION /
    ASYNCLLM_PREFILL_ATTENTION. "fa4" where FlashAttention-4 is not importable on this GPU falls
    back to the default "triton-v1" with a warning (the start-up line says what runs)."""
    decode, prefill = envs.decode_attention(), envs.prefill_attention()
    if decode not in ("triton", "triton-v1", "fa4"):
        raise ValueError(
            f"ASYNCLLM_DECODE_ATTENTION must be triton, triton-v1 or fa4, got {decode!r}"
        )
    if prefill not in ("triton", "fa4"):
        raise ValueError(f"ASYNCLLM_PREFILL_ATTENTION must be triton or fa4, got {prefill!r}")
    if "fa4" in (decode, prefill):
        from asyncllm.engine.kernels import fa4_attention

        if not fa4_attention.available(device):
            logger.warning(
                "FlashAttention-4 asked for (decode=%s, prefill=%s) but flash_attn.cute does not "
                "import on %s: using the Triton kernels",
                decode,
                prefill,
                device,
            )
            decode = "triton-v1" if decode == "fa4" else decode
            prefill = "triton"
    return decode, prefill


def default_attention_backend(device: torch.device | str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def select_kernel_paths(
    device: torch.device | str,
    dtype: torch.dtype,
    attention_backend: str = "auto",
    *,
    cuda_graphs: bool = False,
    attention: Any = None,
) -> KernelPaths:
    """Everything decided for this device and dtype. `attention`: an already built backend
    (tests); otherwise `attention_backend` by name ("auto": triton on CUDA, torch elsewhere)."""
    from asyncllm.engine.layers.attention_backends import get_attention_backend

    device = torch.device(device)
    fused = select_fused_ops(device, dtype)
    decode_kernel = select_cpu_decode_attention(device, dtype)
    if attention is None:
        name = attention_backend
        if name == "auto":
            name = default_attention_backend(device)
        kernels = ("triton", "triton")
        if name == "triton":
            kernels = select_cuda_attention_kernels(device)
        attention = get_attention_backend(
            name, device, fused_ops=fused, decode_kernel=decode_kernel, cuda_kernels=kernels
        )
    uses_decode_kernel = attention.name == "torch" and getattr(attention, "decode_kernel", False)
    return KernelPaths(
        device=device,
        dtype=dtype,
        attention=attention,
        fused=fused,
        cpu_decode_attention=bool(uses_decode_kernel and decode_kernel),
        cuda_graphs=cuda_graphs and device.type == "cuda",
        fused_moe=select_fused_moe(device, fused),
    )


def linear_methods(model: torch.nn.Module, paths: KernelPaths) -> str:
    """The linear methods a loaded model runs, named (normally one)."""
    names: dict[str, None] = {}
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            names[method.describe(paths.device, paths.dtype)] = None
    return " + ".join(names) or "none"


def moe_methods(model: torch.nn.Module) -> str | None:
    """The MoE methods a loaded model runs, named; None for a model without experts."""
    names: dict[str, None] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "describe") and hasattr(module, "num_experts"):
            names[method.describe(module)] = None
    return " + ".join(names) or None


def log_kernel_paths(paths: KernelPaths, model: torch.nn.Module | None = None) -> str:
    """Log (info) and return the one line naming the paths that run."""
    if model is None:
        line = paths.describe("dense")
    else:
        line = paths.describe(linear_methods(model, paths), moe_methods(model))
    logger.info("%s", line)
    return line
