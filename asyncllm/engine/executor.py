"""Hands each step's message to the model runner(s) and returns what the driver samples from.

World size 1 today: the runner lives in this process and a step is a direct call. A
tensor-parallel executor will send the same `StepMessage` (plain, picklable data) to every rank
process and take the logits from rank 0; the driver (scheduler, sampler, detokenizer) does not
change. `prev_tokens` (async scheduling: the in-flight step's sampled ids, a device tensor) is
passed beside the message, not in it: ranks will hold it on their own devices.
"""

from __future__ import annotations

from typing import Protocol

import torch

from asyncllm.engine.model_runner import ModelRunner, StepLogits
from asyncllm.engine.step_message import StepMessage


class Executor(Protocol):
    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None) -> StepLogits: ...


class UniProcExecutor:
    """One runner, in this process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None) -> StepLogits:
        # Looked up per call, so a test may wrap the runner's execute.
        return self.runner.execute(step, prev_tokens)
