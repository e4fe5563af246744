"""Attention backends by name: the one place that knows them all.

`attention.py` (interface + torch reference) and `triton_attention.py` import nothing from here,
so there is no import circle; the Triton module is imported only when asked for (CPU installs
need not have triton).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from asyncllm.engine.layers.attention import AttentionBackend, TorchAttentionBackend

NAMES = ("torch", "triton")


def get_attention_backend(
    name: str,
    device: torch.device | str,
    fused_ops: Any = None,
    decode_kernel: bool | None = None,
    cuda_kernels: tuple[str, str] = ("triton", "triton"),
) -> AttentionBackend:
    """ "torch" (reference; any device) or "triton" (CUDA; asyncllm.engine.layers.triton_attention).
    `fused_ops` / `decode_kernel`: the torch backend's CPU fast paths (kernel_paths decides).
    `cuda_kernels`: the triton backend's (decode, prefill) kernels ("triton", "triton-v1" for
    decode, "fa4"), already checked by kernel_paths."""
    if name == "torch":
        return TorchAttentionBackend(decode_kernel=decode_kernel, fused_ops=fused_ops)
    if name == "triton":
        if torch.device(device).type != "cuda":
            raise ValueError("attention backend 'triton' needs a CUDA device; use 'torch' on CPU")
        try:
            module = importlib.import_module("asyncllm.engine.layers.triton_attention")
            backend_cls = module.TritonAttentionBackend
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"attention backend 'triton' is not available ({e}); install triton or use 'torch'"
            ) from e
        decode, prefill = cuda_kernels
        return backend_cls(torch.device(device), decode=decode, prefill=prefill)
    raise ValueError(f"unknown attention backend {name!r}; choose 'torch' or 'triton'")
