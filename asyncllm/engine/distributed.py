"""The tensor-parallel group as the layers see it: rank, size, and the collectives they need.

World size 1 today: rank 0, size 1, the collectives are the identity. The tensor-parallel engine
fills these in (torch.distributed: NCCL on CUDA, gloo on the CPU) without touching the layers.
"""

from __future__ import annotations

from torch import Tensor


def get_tp_rank() -> int:
    return 0


def get_tp_size() -> int:
    return 1


def tensor_model_parallel_all_reduce(x: Tensor) -> Tensor:
    """Sum of `x` over the ranks (row-parallel outputs, vocab-parallel embeddings)."""
    if get_tp_size() == 1:
        return x
    raise NotImplementedError("tensor parallelism is not implemented yet")


def tensor_model_parallel_all_gather(x: Tensor, dim: int = -1) -> Tensor:
    """`x` of every rank concatenated along `dim` (vocab-parallel logits)."""
    if get_tp_size() == 1:
        return x
    raise NotImplementedError("tensor parallelism is not implemented yet")
