"""The tensor-parallel group as the layers see it: rank, size, and the collectives they need.

One group per process: a process is rank r of one tensor-parallel engine, or of none (rank 0 of
size 1, where every collective is the identity and torch.distributed is never touched). The
engine's own process is rank 0; `tp_executor` starts the other ranks, each of which calls
`init_tensor_parallel` before it builds its model, so the layers read their rank and size at
construction. Collectives go through torch.distributed's default group: NCCL on CUDA (captured
inside CUDA graphs like any kernel), gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

# NVLink multicast (NVLS) stays off in every process of a tensor-parallel engine: the lent
# machines require it (their fabric does not support it, and NCCL's probe can fail or hang).
NVLS_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_nvlink_multicast(env: MutableMapping[str, str] | None = None) -> None:
    """Set the NVLS-off variables (in this process's environment unless `env` is given); done
    before NCCL starts, in the engine process and in every rank it spawns. Also, unless the user
    chose otherwise, NCCL errors are not handled by tearing the process down
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=0): rank 0 is the server's engine, which must outlive a dead
    rank to report it (the monitor aborts the communicators itself, which that mode expects)."""
    env = os.environ if env is None else env
    env.update(NVLS_OFF_ENV)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


@dataclass
class _Group:
    rank: int = 0
    size: int = 1
    backend: str | None = None
    device: torch.device | None = None  # where this rank's collectives' tensors live


_group = _Group()


def get_tp_rank() -> int:
    return _group.rank


def get_tp_size() -> int:
    return _group.size


def tp_backend() -> str | None:
    return _group.backend


def init_tensor_parallel(
    rank: int,
    size: int,
    device: torch.device,
    store: Any,
    timeout_s: float = 1800.0,
) -> None:
    """Join this process to a tensor-parallel group of `size` ranks through `store` (a
    torch.distributed TCPStore that rank 0 hosts). NCCL when `device` is CUDA, else gloo."""
    import torch.distributed as dist

    if _group.size > 1:
        raise RuntimeError(
            "this process already belongs to a tensor-parallel engine: shut it down first "
            "(LLM.shutdown(), AsyncLLMEngine.shutdown())"
        )
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process; a tensor-parallel "
            "engine needs its own process group"
        )
    disable_nvlink_multicast()
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(device)
        kw["device_id"] = device  # eager communicator set-up: ready before graph capture
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
        **kw,
    )
    _group.rank, _group.size, _group.backend, _group.device = rank, size, backend, device
    # One collective now: the communicators exist before any forward or capture.
    all_reduce_min(1)


def destroy_tensor_parallel() -> None:
    """Leave the group (rank 0, at shutdown, once the other ranks are gone); this process is rank
    0 of 1 again. NCCL's communicators are aborted rather than destroyed: destroying them after
    a CUDA graph captured their collectives can hang (pytorch/pytorch#115388), and the peers are
    gone anyway."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            if _group.backend == "nccl":
                abort_tensor_parallel()
            else:
                dist.destroy_process_group()
    finally:
        _group.rank, _group.size, _group.backend, _group.device = 0, 1, None, None


def abort_tensor_parallel() -> None:
    """Abort the NCCL communicators so a collective blocked on a dead rank returns (with an
    error) instead of waiting for the timeout. Gloo needs none: a dead peer's closed sockets
    already end its collectives."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if _group.backend != "nccl" or not dist.is_initialized():
        return
    abort = getattr(c10d, "_abort_process_group", None)
    if abort is not None:
        abort()


def tensor_model_parallel_all_reduce(x: Tensor) -> Tensor:
    """Sum of `x` over the ranks (row-parallel outputs, vocab-parallel embeddings), in place."""
    if _group.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: Tensor, dim: int = -1) -> Tensor:
    """`x` of every rank concatenated along `dim` (vocab-parallel logits)."""
    if _group.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    # The ranks' tensors stacked along dim 0 (the layout every backend accepts), then moved.
    flat = torch.empty((_group.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(flat, x)
    out = flat.view(_group.size, *x.shape)
    dim = dim % x.dim()
    # [ranks, ..., d, ...] -> [..., ranks, d, ...] -> [..., ranks * d, ...]
    return out.movedim(0, dim).flatten(dim, dim + 1)


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """`x` of rank `src` on every rank, in place (the sampled ids of the step in flight)."""
    if _group.size == 1:
        return x
    import torch.distributed as dist

    dist.broadcast(x, src)
    return x


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's `value` (the KV cache size every rank can hold)."""
    if _group.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
