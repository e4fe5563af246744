"""Hands each step's message to the model runner(s) and returns what the driver samples from.

At world size 1 the runner lives in this process and a step is a direct call. The
tensor-parallel executor (tp_executor.MultiprocExecutor) sends the same `StepMessage` (plain,
picklable data) to every rank process and takes the logits from rank 0; the driver (scheduler,
sampler, detokenizer) does not change. `prev_tokens` (async scheduling: the in-flight step's
sampled ids, a device tensor) is passed beside the message, not in it: each rank gets it on its
own device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from asyncllm.engine.model_runner import ModelRunner, StepLogits
from asyncllm.engine.step_message import StepMessage


class Executor(Protocol):
    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None) -> StepLogits: ...

    def add_failure_callback(self, cb: Callable[[str], None]) -> None:
        """`cb(message)` once if a part of the executor outside this thread dies (a rank)."""
        ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """One runner, in this process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None) -> StepLogits:
        # Looked up per call, so a test may wrap the runner's execute.
        return self.runner.execute(step, prev_tokens)

    def add_failure_callback(self, cb: Callable[[str], None]) -> None:
        pass  # nothing here dies on its own

    def shutdown(self) -> None:
        pass
