"""Triton kernels for paged attention and cache writes, the CPU's C kernels, plain-torch references.

Exports are lazy: `reference` needs only torch, the kernels need triton (not installed everywhere).
Which of them an engine runs is decided once, at start-up, by asyncllm.engine.kernel_paths.
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


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
