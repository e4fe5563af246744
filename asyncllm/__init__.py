"""asyncllm: an LLM inference engine with an async SDK, a resumable WebSocket gateway and client.

Exports are lazy so that `import asyncllm.client` never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "asyncllm.engine.llm",
    "AsyncLLMEngine": "asyncllm.engine.async_engine",
    "EngineDeadError": "asyncllm.engine.async_engine",
    "LLMEngine": "asyncllm.engine.llm_engine",
    "EngineStats": "asyncllm.engine.llm_engine",
    "EngineArgs": "asyncllm.config",
    "SamplingParams": "asyncllm.sampling_params",
    "RequestOutputKind": "asyncllm.sampling_params",
    "RequestOutput": "asyncllm.outputs",
    "CompletionOutput": "asyncllm.outputs",
    "Logprob": "asyncllm.outputs",
}

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "EngineDeadError",
    "LLMEngine",
    "EngineStats",
    "EngineArgs",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]

if TYPE_CHECKING:
    from asyncllm.config import EngineArgs
    from asyncllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
    from asyncllm.engine.llm import LLM
    from asyncllm.engine.llm_engine import EngineStats, LLMEngine
    from asyncllm.outputs import CompletionOutput, Logprob, RequestOutput
    from asyncllm.sampling_params import RequestOutputKind, SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
