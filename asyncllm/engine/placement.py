"""Where each engine process of a data-parallel group runs: one GPU each, or on a CPU host one
NUMA node each (the cores of a node share its memory: an engine that stays on one node reads
its weights and KV cache at local speed).

The plan is made in the parent (`plan_placements`); the child applies its placement before it
builds its engine (`PlacedFactory`, the engine factory of its ProcessTransport): on CUDA it
sees only its GPU (CUDA_VISIBLE_DEVICES, read when CUDA initializes, which in a spawned child
has not happened yet); on the CPU it is pinned to its cores and runs that many threads. No torch
at import: the gateway process imports this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncllm.config import EngineArgs

logger = logging.getLogger(__name__)

NODE_ROOT = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class Placement:
    index: int  # the engine's rank in the group
    cuda_device: str | None = None  # the GPU (as the parent names it), for CUDA_VISIBLE_DEVICES
    cpus: tuple[int, ...] | None = None  # the cores it is pinned to (CPU engines)

    def describe(self) -> str:
        if self.cuda_device is not None:
            return f"engine {self.index}: GPU {self.cuda_device}"
        if self.cpus is not None:
            return f"engine {self.index}: CPUs {_ranges(self.cpus)} ({len(self.cpus)} threads)"
        return f"engine {self.index}"


def parse_cpulist(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def numa_nodes(root: Path = NODE_ROOT) -> list[list[int]]:
    """The CPUs of each NUMA node this process may run on (nodes without any left out); one
    node of every allowed CPU where the kernel says nothing."""
    allowed = sorted(os.sched_getaffinity(0))
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = [c for c in parse_cpulist((d / "cpulist").read_text()) if c in allowed]
        except (OSError, ValueError):
            continue
        if cpus:
            nodes.append(cpus)
    return nodes or [allowed]


def cpu_groups(n: int, nodes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """N disjoint groups of cores: a node each while there are nodes enough (the first N),
    else every core split into N contiguous runs (node by node), as even as they go."""
    if n <= len(nodes):
        return [tuple(nodes[i]) for i in range(n)]
    cpus = [c for node in nodes for c in node]
    if n > len(cpus):
        raise ValueError(
            f"data_parallel_size {n} is more than the {len(cpus)} CPUs this process may use"
        )
    q, r = divmod(len(cpus), n)
    groups, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        groups.append(tuple(cpus[start : start + size]))
        start += size
    return groups


def cuda_devices() -> list[str]:
    """The GPUs this process sees, named as CUDA_VISIBLE_DEVICES names them (ids or UUIDs)."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()][:count]
    return [str(i) for i in range(count)]


def uses_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return device == "cuda" or torch.cuda.is_available()


def plan_placements(
    n: int,
    device: str,
    *,
    gpus: Sequence[str] | None = None,
    nodes: Sequence[Sequence[int]] | None = None,
) -> list[Placement]:
    """Where N engines go. `gpus` / `nodes` default to what this host has."""
    if n < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {n}")
    on_cuda = uses_cuda(device) if gpus is None else device != "cpu"
    if on_cuda:
        gpus = list(cuda_devices() if gpus is None else gpus)
        if n > len(gpus):
            raise ValueError(
                f"data_parallel_size {n} needs {n} GPUs; {len(gpus)} visible (one engine per GPU)"
            )
        return [Placement(i, cuda_device=gpus[i]) for i in range(n)]
    groups = cpu_groups(n, numa_nodes() if nodes is None else nodes)
    return [Placement(i, cpus=g) for i, g in enumerate(groups)]


class PlacedFactory:
    """The engine factory a data-parallel child runs: apply the placement, then build the
    engine. Picklable (it crosses to the spawned child)."""

    def __init__(
        self, placement: Placement, inner: Callable[[EngineArgs], Any] | None = None
    ) -> None:
        self.placement = placement
        self.inner = inner

    def __call__(self, args: EngineArgs) -> Any:
        apply_placement(self.placement)
        if self.inner is not None:
            return self.inner(args)
        from asyncllm.engine.llm_engine import LLMEngine

        return LLMEngine.from_engine_args(args)


def apply_placement(p: Placement) -> None:
    """In the child, before anything touches CUDA or starts a thread pool."""
    if p.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = p.cuda_device
    if p.cpus is not None:
        os.sched_setaffinity(0, p.cpus)
        n = str(len(p.cpus))
        os.environ["OMP_NUM_THREADS"] = n  # the C kernels' OpenMP, if not yet started
        import torch

        torch.set_num_threads(len(p.cpus))
    logger.info("asyncllm: %s", p.describe())


def _ranges(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
