"""asyncllm: an LLM inference engine with an async SDK, a resumable WebSocket gateway and client.

Exports are lazy so that `import asyncllm.client` never imports torch. A client-only install
(`pip install "asyncllm[client]"`) has no engine: `from asyncllm import LLM` (or AsyncLLMEngine,
LLMEngine, ...) then raises an ImportError that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

SERVE_INSTALL = 'pip install "asyncllm[serve]"'

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

# Exports that need the engine (the `engine` extra). AsyncLLMEngine's module imports torch only
# when the engine starts, so these modules are looked for up front: the error comes at the import.
_ENGINE_EXPORTS = {"LLM", "AsyncLLMEngine", "EngineDeadError", "LLMEngine", "EngineStats"}
_ENGINE_MODULES = ("torch", "transformers")

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

    if name in _ENGINE_EXPORTS:
        for dep in _ENGINE_MODULES:
            if _not_installed(dep):
                err = ModuleNotFoundError(f"No module named {dep!r}", name=dep)
                raise missing_dependency_error(f"asyncllm.{name}", err)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing_dependency_error(f"asyncllm.{name}", e) from e
    value = getattr(mod, name)
    globals()[name] = value
    return value


def missing_dependency_error(what: str, err: ModuleNotFoundError) -> ImportError:
    """The ImportError to raise when `what` needs a third-party module that is not installed (the
    engine's and the gateway's dependencies are the `serve` extra); `err` itself otherwise."""
    missing = (err.name or "").split(".")[0]
    if not missing or missing == "asyncllm":
        return err
    return ImportError(
        f"{what} needs the engine, but {missing!r} is not installed (a client-only install, "
        f"asyncllm[client], has asyncllm.client only): {SERVE_INSTALL}",
        name=missing,
    )


def _not_installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return True
