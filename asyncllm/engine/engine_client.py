"""EngineClient: what a server needs from an engine, as a typed contract.

The gateway is written against this Protocol, not against AsyncLLMEngine: the real engine
implements it, and so do the gateway tests' stub engines (tests/gateway_helpers.py), so the
gateway never probes an engine for what it can do (no hasattr / getattr defaults). No torch here:
the gateway imports it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import SamplingParams


class ServedModel(Protocol):
    """The part of ModelConfig a server reads."""

    @property
    def served_model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...


class EngineStatsView(Protocol):
    """The part of EngineStats a server reads (the metrics' gauges)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_blocks_total(self) -> int: ...

    @property
    def kv_blocks_free(self) -> int: ...


class OutputIterator(Protocol):
    """What `generate` returns: an async iterator of outputs that can be closed early (an async
    generator is one)."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def __anext__(self) -> Awaitable[RequestOutput]: ...

    def aclose(self) -> Awaitable[None]: ...


@runtime_checkable
class EngineClient(Protocol):
    """An engine a server can start, stream from and stop.

    `tokenizer`, `model_config` and `vocab_size` are None until the model is loaded (`start()`),
    unless the engine was built around a loaded one."""

    @property
    def tokenizer(self) -> Any:
        """A transformers tokenizer: encode, apply_chat_template, chat_template, len()."""
        ...

    @property
    def model_config(self) -> ServedModel | None: ...

    @property
    def vocab_size(self) -> int | None: ...

    @property
    def errored(self) -> bool:
        """True once a fatal error stopped the engine: it takes no more requests."""
        ...

    async def start(self) -> None:
        """Load the model (off the event loop) and start serving. Idempotent."""
        ...

    async def shutdown(self) -> None:
        """Abort what is open, stop, free the model. Idempotent."""
        ...

    def stats(self) -> EngineStatsView:
        """The engine's latest stats snapshot (no wait)."""
        ...

    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> OutputIterator:
        """One request's outputs. With `sink`, each output goes to `sink(output)` on the event
        loop instead and the iteration yields nothing, ending with the request. Leaving the
        iteration early aborts the request. Bad input raises ValueError (at the latest from the
        first iteration)."""
        ...

    async def abort(self, request_id: str) -> None:
        """End a request and wait until the engine has let go of it; unknown ids are a no-op."""
        ...
