"""Tensor parallelism, the engine's side: rank 0 here, ranks 1..N-1 in worker processes
(tp_group.WorkerGroup starts and watches them; tp_worker.py is their main).

The scheduler, the sampler and every request's state stay in this process (rank 0). Each step
the executor pickles the step message once and writes the same bytes down a pipe to every
worker; every rank, this one included, then runs the same runner code on the same message, so
all of them issue the same collectives in the same order (the all-reduces inside the forward,
the logits' all-gather). Only rank 0 samples: the sampler needs live request state (per-request
generators, penalties over generated tokens) that the workers never hold. With async scheduling
the in-flight step's sampled ids (a device tensor of a few hundred bytes) are broadcast to the
ranks on the device, beside the message.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

import torch

from asyncllm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from asyncllm.engine import distributed
from asyncllm.engine.model_runner import ModelRunner, StepLogits
from asyncllm.engine.step_message import StepMessage
from asyncllm.engine.tp_group import TensorParallelError, WorkerGroup, rank_device

__all__ = ["MultiprocExecutor", "TensorParallelError", "build_tensor_parallel"]


def check_tensor_parallel(hf_config: Any, tp: int) -> None:
    """ValueError, before any process starts, when the model cannot be split `tp` ways."""
    from asyncllm.engine.models.llama import num_kv_heads_of

    heads = int(hf_config.num_attention_heads)
    kv = num_kv_heads_of(hf_config)
    if heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's {heads} attention heads"
        )
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(
            f"tensor_parallel_size {tp} and the model's {kv} KV heads must divide one another"
        )
    inter = getattr(hf_config, "intermediate_size", None)
    if inter and int(inter) % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's intermediate_size {inter}"
        )


class MultiprocExecutor:
    """The step message to every rank, this one's logits to the driver."""

    def __init__(self, runner: ModelRunner, workers: WorkerGroup):
        self.runner = runner
        self.workers = workers

    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None) -> StepLogits:
        group = self.workers
        group.raise_if_failed()
        n = -1 if prev_tokens is None else int(prev_tokens.numel())
        payload = pickle.dumps((step, n), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            group.send(payload)
            if prev_tokens is not None:
                prev_tokens = distributed.broadcast(prev_tokens.contiguous(), src=0)
            return self.runner.execute(step, prev_tokens)
        except Exception:
            group.raise_if_failed(wait_s=3.0)  # a dead rank, named, rather than a socket error
            raise

    def add_failure_callback(self, cb: Callable[[str], None]) -> None:
        self.workers.add_failure_callback(cb)

    def shutdown(self) -> None:
        self.workers.shutdown()


def build_tensor_parallel(
    args: EngineArgs, model_config: ModelConfig
) -> tuple[ModelConfig, CacheConfig, SchedulerConfig, ModelRunner, MultiprocExecutor]:
    """Rank 0's engine parts: the workers started and joined, this rank's runner built (every
    rank builds its own: its shard of the weights, its KV cache), the executor over them."""
    from asyncllm.engine.engine_builder import build_runner

    check_tensor_parallel(model_config.hf_config, args.tensor_parallel_size)
    mc = dataclasses.replace(model_config, device=rank_device(model_config.device, 0))
    group = WorkerGroup(args, mc)
    group.start()
    try:
        cc, sc, runner = build_runner(args, mc)
    except BaseException as e:
        failed = group.failure is not None or group._failed.wait(3.0)
        group.shutdown()
        if failed and group.error is not None:
            raise group.error from e  # the worker's own error (a ValueError stays one)
        if failed:
            raise TensorParallelError(group.failure) from e
        raise
    return mc, cc, sc, runner, MultiprocExecutor(runner, group)
