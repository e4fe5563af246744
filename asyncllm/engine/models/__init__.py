"""Our torch model implementations, looked up by transformers' architecture name."""

from __future__ import annotations

from typing import Any

from asyncllm.engine.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "kv_cache_shape", "supported_architectures"]


def kv_cache_shape(hf_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the paged KV cache."""
    from asyncllm.engine.models.llama import head_dim_of, num_kv_heads_of

    return int(hf_config.num_hidden_layers), num_kv_heads_of(hf_config), head_dim_of(hf_config)
