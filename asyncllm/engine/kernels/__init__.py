"""Triton kernels for paged attention and cache writes, the CPU's C kernels, plain-torch references.

Exports are lazy: `reference` needs only torch, the kernels need triton (not installed everywhere).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TritonAttentionBackend": "asyncllm.engine.layers.triton_attention",
    "write_kv_cache": "asyncllm.engine.kernels.cache_write",
    "paged_decode_attention": "asyncllm.engine.kernels.decode_attention",
    "paged_prefill_attention": "asyncllm.engine.kernels.prefill_attention",
    "build_prefill_work": "asyncllm.engine.kernels.prefill_attention",
    "paged_attention_ref": "asyncllm.engine.kernels.reference",
    "write_kv_cache_ref": "asyncllm.engine.kernels.reference",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


_fused: Any = None


def fused_ops(x: Any) -> Any:
    """The layers' hook for their fast path: the Triton fused-kernel module
    (asyncllm.engine.kernels.fused) when `x` is a CUDA tensor and triton imports; the C one
    (asyncllm.engine.kernels.cpu_fused, same functions) when `x` is a float32 CPU tensor and its
    library builds; else None (the layers' torch ops). `ASYNCLLM_FUSED=0` turns off the first,
    `ASYNCLLM_CPU_FUSED=0` the second."""
    global _fused
    if not getattr(x, "is_cuda", False):
        if getattr(getattr(x, "device", None), "type", None) != "cpu":
            return None
        from asyncllm.engine.kernels import cpu_fused

        return cpu_fused if cpu_fused.available(x) else None
    if _fused is None:
        try:
            from asyncllm.engine.kernels import fused
        except ImportError:
            _fused = False
        else:
            _fused = fused
    if _fused is False or not _fused.enabled(x):
        return None
    return _fused


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
