"""Our torch model implementations, looked up by transformers' architecture name."""

from __future__ import annotations

from typing import Any

from asyncllm.engine.models.registry import get_model_class, supported_architectures

__all__ = [
    "get_model_class",
    "kv_cache_shape",
    "kv_cache_window",
    "sliding_windows",
    "supported_architectures",
]


def kv_cache_shape(hf_config: Any, tp_size: int = 1) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of one rank's paged KV cache: the KV heads are split
    across `tp_size` ranks, one (replicated) per rank when there are fewer heads than ranks."""
    from asyncllm.engine.models.llama import head_dim_of, num_kv_heads_of

    kv_heads = num_kv_heads_of(hf_config)
    kv_heads = kv_heads // tp_size if kv_heads >= tp_size else 1
    return int(hf_config.num_hidden_layers), kv_heads, head_dim_of(hf_config)


def sliding_windows(hf_config: Any) -> list[int | None]:
    """Each layer's sliding window (None = full attention), as transformers decides it:
    `layer_types` where the config has them (Gemma 2/3; Qwen2 from use_sliding_window and
    max_window_layers), else every layer when `sliding_window` is set (Mistral, Phi-3)."""
    n = int(hf_config.num_hidden_layers)
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return [None] * n
    types = getattr(hf_config, "layer_types", None)
    if types:
        if len(types) != n:
            raise ValueError(f"config.layer_types has {len(types)} entries for {n} layers")
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [int(window)] * n


def kv_cache_window(hf_config: Any) -> int | None:
    """How far back any layer reads when every layer has a window (their largest), else None:
    KV blocks before it can be given back (block_manager.release_outside_window)."""
    try:
        windows = sliding_windows(hf_config)
    except (AttributeError, TypeError, ValueError):
        return None
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)
