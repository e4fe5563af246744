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

Every expert parameter carries `weight_loader(param, loaded_weight, shard_id=None)` as the linear
layers' do (models/weights.py loads through it): shard_id is (shard, expert) for one expert's
projection, shard in "w1" (gate) / "w3" (up) / "w2" (down), or None for a tensor of all experts;
its `shard_ids` list every (shard, expert) a complete load brings.

Apply: the Triton fused-MoE kernels (kernels/fused_moe.py: routing, sort, two grouped GEMMs; no
host syncs, graph-capturable) where the engine's kernel paths chose them (CUDA with triton, once
at start-up); elsewhere `grouped_moe_torch`, which sorts the (token, slot) pairs by expert and
runs one GEMM pair per expert that was hit.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asyncllm.engine import distributed
from asyncllm.engine.layers.linear import ReplicatedLinear, set_weight_attrs

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


def expert_weight_target(name: str) -> tuple[str, tuple[str, int] | None] | None:
    """A checkpoint tensor name -> (our parameter name, shard id for its weight_loader:
    (shard, expert), or None for a tensor of all experts); None when the name is no expert
    weight."""
    m = _PER_EXPERT.match(name)
    if m:
        prefix, expert, proj, suffix = m.groups()
        shard = _SHARD_OF[proj]
        stack = "w2" if shard == "w2" else "w13"
        return f"{prefix}.{stack}_{suffix}", (shard, int(expert))
    m = _FUSED.match(name)
    if m:
        prefix, proj, _ = m.groups()
        return f"{prefix}.{'w13' if proj == 'gate_up_proj' else 'w2'}_weight", None
    return None


def select_experts(
    router_logits: Tensor, top_k: int, renormalize: bool, use_triton: bool = False
) -> tuple[Tensor, Tensor]:
    """Softmax over the experts (in float32), then the top k; renormalised to sum to 1 when asked
    (Mixtral always, Qwen-MoE with `norm_topk_prob`). -> (float32 weights, int32 ids), each [T, k].
    `use_triton`: one kernel (kernels/fused_moe.topk_softmax) instead of five."""
    if use_triton and router_logits.dim() == 2:
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


class FusedMoEMethod:
    """How an MoE layer stores and applies its experts' weights (see the module docstring)."""

    name = "base"

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

    def describe(self, layer: FusedMoE) -> str:
        """What runs, for the start-up line (asyncllm.engine.kernel_paths)."""
        return self.name


class UnquantizedFusedMoEMethod(FusedMoEMethod):
    """Dense float experts: w13_weight [E, 2I, H], w2_weight [E, H, I]."""

    name = "dense"

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype
    ):
        inter = intermediate_size_per_partition
        w13 = torch.empty(num_experts, 2 * inter, hidden_size, dtype=params_dtype)
        layer.register_expert_param("w13_weight", nn.Parameter(w13, requires_grad=False), "w13")
        w2 = torch.empty(num_experts, hidden_size, inter, dtype=params_dtype)
        layer.register_expert_param("w2_weight", nn.Parameter(w2, requires_grad=False), "w2")

    def apply(self, layer, x, topk_weights, topk_ids):
        if layer.use_triton:
            from asyncllm.engine.kernels.fused_moe import fused_moe

            return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)
        return grouped_moe_torch(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)

    def describe(self, layer):
        return "dense triton" if layer.use_triton else "dense grouped-torch"


def _shard_ids(kind: str, num_experts: int) -> list[tuple[str, int]]:
    shards = ("w1", "w3") if kind == "w13" else ("w2",)
    return [(s, e) for e in range(num_experts) for s in shards]


class FusedMoE(nn.Module):
    """The experts of one layer. forward(x [T,H], topk_weights, topk_ids [T,k]) -> [T,H], this
    rank's partial sum under tensor parallelism (the block all-reduces).

    With tensor parallelism each rank holds I/tp_size of every expert's intermediate dimension
    (w13's rows of each half, w2's columns). `use_triton`: the fused kernels (the engine's
    kernel paths decide, once)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype | None = None,
        quant_config: Any = None,
        prefix: str = "",
        tp_rank: int | None = None,
        tp_size: int | None = None,
        use_triton: bool = False,
    ):
        super().__init__()
        self.tp_rank = distributed.get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = distributed.get_tp_size() if tp_size is None else tp_size
        if intermediate_size % self.tp_size:
            raise ValueError(
                f"{prefix}: moe intermediate size {intermediate_size} is not divisible by "
                f"tp_size {self.tp_size}"
            )
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size // self.tp_size
        self.prefix = prefix
        self.use_triton = use_triton
        method = None if quant_config is None else _moe_method(quant_config, self, prefix)
        self.quant_method: FusedMoEMethod = method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(
            self,
            num_experts,
            hidden_size,
            self.intermediate_size_per_partition,
            params_dtype or torch.get_default_dtype(),
        )

    def register_expert_param(self, name: str, param: nn.Parameter, kind: str) -> None:
        """Register a parameter shaped like w13 ([E, 2I, H] at this rank's I) or w2 ([E, H, I])
        with this layer's loader. A method's other parameters (scales) set their own
        `weight_loader` and `shard_ids` (set_weight_attrs) and register themselves."""
        if kind not in ("w13", "w2"):
            raise ValueError(f"expert parameter kind must be 'w13' or 'w2', got {kind!r}")
        attrs = {
            "weight_loader": self.weight_loader,
            "moe_kind": kind,
            "shard_ids": _shard_ids(kind, self.num_experts),
        }
        set_weight_attrs(param, attrs)
        self.register_parameter(name, param)

    def _tp_slice(self, t: Tensor, dim: int) -> Tensor:
        if self.tp_size == 1:
            return t
        size = self.intermediate_size_per_partition
        return t.narrow(dim, self.tp_rank * size, size)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Tensor, shard_id: Any = None
    ) -> None:
        """Copy a checkpoint tensor into `param`: shard_id (shard, expert) for one expert's gate
        ("w1"), up ("w3") or down ("w2") projection, None for the tensor of all experts."""
        kind = param.moe_kind
        inter = self.intermediate_size_per_partition
        if shard_id is None:
            if kind == "w13":
                gate, up = loaded_weight.chunk(2, dim=1)
                src = torch.cat([self._tp_slice(gate, 1), self._tp_slice(up, 1)], dim=1)
            else:
                src = self._tp_slice(loaded_weight, 2)
            dest = param.data
        else:
            shard, expert = shard_id
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"{self.prefix}: expert {expert} of {self.num_experts}")
            if shard not in (("w1", "w3") if kind == "w13" else ("w2",)):
                raise ValueError(f"{self.prefix}: shard {shard!r} does not belong to {kind}")
            dest = param.data[expert]
            if shard == "w2":
                src = self._tp_slice(loaded_weight, 1)
            else:
                src = self._tp_slice(loaded_weight, 0)
                dest = dest.narrow(0, 0 if shard == "w1" else inter, inter)
        if dest.shape != src.shape:
            raise ValueError(
                f"{self.prefix}: expert tensor of shape {tuple(loaded_weight.shape)} does not fit "
                f"{kind} (expects {tuple(dest.shape)} after this rank's slice)"
            )
        dest.copy_(src)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        return self.quant_method.apply(self, x, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"inter={self.intermediate_size_per_partition}, method={self.quant_method.name}"
        )


def _moe_method(quant_config: Any, layer: FusedMoE, prefix: str) -> FusedMoEMethod | None:
    get = getattr(quant_config, "get_moe_method", None)
    if get is None:
        raise ValueError(
            f"quantization {getattr(quant_config, 'name', quant_config)!r} has no "
            f"mixture-of-experts method ({prefix})"
        )
    return get(layer, prefix)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ an optional shared expert, optionally behind a sigmoid gate, as
    Qwen2-MoE). Module names follow transformers': gate, experts, shared_expert,
    shared_expert_gate. The router and the shared expert's gate stay in float whatever the
    checkpoint's format (quantized checkpoints keep them so)."""

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
        use_triton: bool = False,
    ):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.use_triton = use_triton
        self.gate = ReplicatedLinear(
            hidden_size, num_experts, params_dtype=params_dtype, prefix=f"{prefix}.gate"
        )
        self.experts = FusedMoE(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            use_triton=use_triton,
        )
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            ReplicatedLinear(
                hidden_size, 1, params_dtype=params_dtype, prefix=f"{prefix}.shared_expert_gate"
            )
            if shared_expert is not None and shared_expert_gate
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize, self.use_triton)
        out = distributed.tensor_model_parallel_all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # its down projection all-reduces itself
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
