"""Mixture-of-experts MLP: a router, top-k expert selection, and the experts' weights stacked per
layer (w13 [E, 2I, H]: each expert's gate rows then up rows; w2 [E, H, I]).

How the experts' weights are stored and applied is a `FusedMoEMethod` (the MoE twin of the linear
layers' `LinearMethod`): dense float here; a quantized format (fp8, ...) plugs in by a config
whose `get_moe_method(layer, prefix)` returns its own method, registering its own parameters
(e.g. fp8 `w13_weight` plus `w13_weight_scale`) with their `weight_loader`s. Models never branch
on a format.

Checkpoints name experts one tensor each (`experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's
`experts.{e}.w1/w3/w2`) or fused per layer (`experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I], transformers 5's in-memory layout); `expert_weight_target` maps
either to our parameter, expert and shard.

Apply: on CUDA the Triton fused-MoE kernel (kernels/fused_moe.py: two grouped GEMM launches, no
host syncs, graph-capturable); elsewhere `grouped_moe_torch`, which sorts the (token, slot) pairs
by expert and runs one GEMM pair per expert that was hit.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# checkpoint projection name -> our shard id (w1 gate, w3 up: halves of w13; w2 down)
_SHARD_OF = {
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
    "w1": "w1",
    "w3": "w3",
    "w2": "w2",
}
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\w+)$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(?:\.(weight))?$")


def expert_weight_target(name: str) -> tuple[str, int | None, str | None] | None:
    """A checkpoint tensor name -> (our parameter name, expert id or None for all experts,
    shard id or None for the whole parameter); None when the name is no expert weight."""
    m = _PER_EXPERT.match(name)
    if m:
        prefix, expert, proj, suffix = m.groups()
        shard = _SHARD_OF[proj]
        stack = "w2" if shard == "w2" else "w13"
        return f"{prefix}.{stack}_{suffix}", int(expert), shard
    m = _FUSED.match(name)
    if m:
        prefix, proj, _ = m.groups()
        return f"{prefix}.{'w13' if proj == 'gate_up_proj' else 'w2'}_weight", None, None
    return None


def select_experts(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over the experts (in float32), then the top k; renormalised to sum to 1 when asked
    (Mixtral always, Qwen-MoE with `norm_topk_prob`). -> (float32 weights, int32 ids), each [T, k].
    On CUDA one Triton kernel (kernels/fused_moe.topk_softmax) instead of five."""
    if _fused_kernel_usable(router_logits) and router_logits.dim() == 2:
        from asyncllm.engine.kernels.fused_moe import topk_softmax

        return topk_softmax(router_logits.contiguous(), top_k, renormalize)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def grouped_moe_torch(
    x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> Tensor:
    """The experts in torch ops, grouped: (token, slot) pairs sorted by expert, one gate/up and
    one down GEMM per expert that was hit (never all experts for every token). Follows
    transformers' per-expert arithmetic (project, silu * up, down, times the weight, added up).
    Syncs with the host once (the per-expert counts): the CPU path, not for CUDA graphs."""
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tokens = order // top_k
    xs = x[tokens]
    ys = torch.empty(flat.numel(), hidden, dtype=x.dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = slice(start, start + count)
        h = F.linear(xs[rows], w13[expert])
        ys[rows] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[expert])
        start += count
    weights = topk_weights.reshape(-1)[order]
    ys = (ys * weights[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, ys)


def _fused_kernel_usable(x: Tensor) -> bool:
    if not x.is_cuda or os.environ.get("ASYNCLLM_FUSED", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FusedMoEMethod:
    """How an MoE layer stores and applies its experts' weights (see the module docstring)."""

    def create_weights(
        self,
        layer: FusedMoE,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        """Once, after every weight is loaded (repacking, scales...)."""

    def apply(self, layer: FusedMoE, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        raise NotImplementedError


class UnquantizedFusedMoEMethod(FusedMoEMethod):
    """Dense float experts: w13_weight [E, 2I, H], w2_weight [E, H, I]."""

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype
    ):
        inter = intermediate_size_per_partition
        w13 = nn.Parameter(
            torch.empty(num_experts, 2 * inter, hidden_size, dtype=params_dtype),
            requires_grad=False,
        )
        w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, inter, dtype=params_dtype), requires_grad=False
        )
        layer.register_expert_param("w13_weight", w13, "w13")
        layer.register_expert_param("w2_weight", w2, "w2")

    def apply(self, layer, x, topk_weights, topk_ids):
        if _fused_kernel_usable(x):
            from asyncllm.engine.kernels.fused_moe import fused_moe

            return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)
        return grouped_moe_torch(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    """The experts of one layer. forward(x [T,H], topk_weights, topk_ids [T,k]) -> [T,H].

    With tensor parallelism each rank holds I/tp_size of every expert's intermediate dimension
    (w13's rows of each half, w2's columns); the caller all-reduces the output."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype | None = None,
        quant_config: Any = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(
                f"moe intermediate size {intermediate_size} is not divisible by tp_size {tp_size}"
            )
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size // tp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.prefix = prefix
        self._shards: dict[str, tuple[str, ...]] = {}
        self._loaders: dict[str, Callable[..., None]] = {}
        if quant_config is None:
            self.quant_method: FusedMoEMethod = UnquantizedFusedMoEMethod()
        elif hasattr(quant_config, "get_moe_method"):
            self.quant_method = quant_config.get_moe_method(self, prefix)
        else:
            raise ValueError(
                f"quantization {getattr(quant_config, 'name', quant_config)!r} has no "
                f"mixture-of-experts method ({prefix})"
            )
        self.quant_method.create_weights(
            self,
            num_experts,
            hidden_size,
            self.intermediate_size_per_partition,
            params_dtype or torch.get_default_dtype(),
        )

    def register_expert_param(
        self,
        name: str,
        param: nn.Parameter,
        kind: str | None,
        loader: Callable[..., None] | None = None,
        shards: tuple[str, ...] | None = None,
    ) -> None:
        """Register an expert parameter and how it loads. kind "w13" ([E, 2I, H]) or "w2"
        ([E, H, I]) shaped ones load through `weight_loader`; a method's other parameters
        (scales) pass kind None, their own loader(param, tensor, shard_id, expert_id) and the
        shard ids a complete load of one expert brings (e.g. ("w1", "w3")).
        Loaders live on the module, not on the parameter: building on the meta device and
        `to_empty` replaces parameter objects (their attributes are lost)."""
        if loader is None:
            if kind not in ("w13", "w2"):
                raise ValueError(f"expert parameter kind must be 'w13' or 'w2', got {kind!r}")
            loader = functools.partial(self.weight_loader, kind=kind)
        if shards is None:
            if kind is None:
                raise ValueError(f"{name}: a parameter without a kind must name its shards")
            shards = ("w1", "w3") if kind == "w13" else ("w2",)
        self._shards[name] = shards
        self._loaders[name] = loader
        self.register_parameter(name, param)

    def load_weight(
        self,
        name: str,
        loaded_weight: Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
    ) -> None:
        """Load a checkpoint tensor into this layer's parameter `name` (e.g. "w13_weight")."""
        if name not in self._loaders:
            raise ValueError(f"{self.prefix} has no expert parameter {name!r}")
        self._loaders[name](getattr(self, name), loaded_weight, shard_id, expert_id)

    def _units(self, name: str, shard_id: str | None, expert_id: int | None) -> set[tuple]:
        experts = range(self.num_experts) if expert_id is None else (expert_id,)
        shards = (shard_id,) if shard_id is not None else self._shards[name]
        return {(name, e, s) for e in experts for s in shards}

    def expected_loads(self) -> set[tuple]:
        """The (param, expert, shard) units a complete load covers: with `loaded_units`, for
        checking that a checkpoint loaded every expert exactly once, per-expert or fused."""
        return set().union(*(self._units(n, None, None) for n in self._shards))

    def loaded_units(self, name: str, shard_id: str | None, expert_id: int | None) -> set[tuple]:
        """The units one `load_weight(name, ..., shard_id, expert_id)` call fills."""
        return self._units(name, shard_id, expert_id)

    def _tp_slice(self, t: Tensor, dim: int) -> Tensor:
        if self.tp_size == 1:
            return t
        size = self.intermediate_size_per_partition
        return t.narrow(dim, self.tp_rank * size, size)

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
        *,
        kind: str,
    ) -> None:
        """Copy a checkpoint tensor into `param` (of kind "w13" or "w2"): one expert's gate
        ("w1"), up ("w3") or down ("w2") projection, or (expert_id None) the fused tensor of
        all experts."""
        inter = self.intermediate_size_per_partition
        if expert_id is None:
            if shard_id is not None:
                raise ValueError(f"{self.prefix}: a fused expert tensor takes no shard id")
            if kind == "w13":
                gate, up = loaded_weight.chunk(2, dim=1)
                src = torch.cat([self._tp_slice(gate, 1), self._tp_slice(up, 1)], dim=1)
            else:
                src = self._tp_slice(loaded_weight, 2)
            dest = param.data
        else:
            if not 0 <= expert_id < self.num_experts:
                raise ValueError(f"{self.prefix}: expert {expert_id} of {self.num_experts}")
            want = ("w1", "w3") if kind == "w13" else ("w2",)
            if shard_id not in want:
                raise ValueError(f"{self.prefix}: shard {shard_id!r} does not belong to {kind}")
            dest = param.data[expert_id]
            if shard_id == "w2":
                src = self._tp_slice(loaded_weight, 1)
            else:
                src = self._tp_slice(loaded_weight, 0)
                dest = dest.narrow(0, 0 if shard_id == "w1" else inter, inter)
        if dest.shape != src.shape:
            raise ValueError(
                f"{self.prefix}: expert tensor of shape {tuple(loaded_weight.shape)} does not fit "
                f"{kind} (expects {tuple(dest.shape)} after this rank's slice)"
            )
        dest.copy_(src)

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        return self.quant_method.apply(self, x, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ an optional shared expert, optionally behind a sigmoid gate, as
    Qwen2-MoE). Module names follow transformers': gate, experts, shared_expert,
    shared_expert_gate."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: Any = None,
        prefix: str = "",
    ):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        # the router stays in float (quantized checkpoints keep it so)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=params_dtype)
        self.experts = FusedMoE(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False, dtype=params_dtype)
            if shared_expert is not None and shared_expert_gate
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
