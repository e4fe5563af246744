"""Checkpoint tensors -> a model's parameters through their `weight_loader`s.

A model says how transformers' separate projections stack into its merged ones (`stacked`:
checkpoint part -> (our part, shard id)); everything else loads by its own name. A tensor fused
on disk (e.g. Phi-3's `qkv_proj`) matches our parameter's name and loads whole (shard id None).
Every parameter (every shard of a merged one) must be loaded. Names that substring replacement
cannot map (an MoE layer's `experts.{e}.gate_proj` -> our stacked `experts.w13_weight`, shard
("w1", e)) go through the model's `remap`; a parameter may list its own `shard_ids` (the experts'
(shard, expert) pairs) where its module's do not apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn


def default_weight_loader(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
    """A parameter with no loader of its own (norms): the whole tensor, same shape."""
    if shard_id is not None:
        raise ValueError(f"a plain parameter has no shards (got shard id {shard_id!r})")
    if param.shape != loaded.shape:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def _expected_shards(model: nn.Module) -> dict[str, set[Any]]:
    """Parameter name -> the shard ids it needs ({None}: loaded whole)."""
    out: dict[str, set[Any]] = {}
    for mname, module in model.named_modules():
        shard_ids = getattr(module, "shard_ids", None)
        for pname, p in module.named_parameters(prefix=mname, recurse=False):
            if getattr(p, "shard_ids", None):
                out[pname] = set(p.shard_ids)
            elif shard_ids and getattr(p, "output_dim", None) is not None:
                out[pname] = set(shard_ids)
            else:
                out.setdefault(pname, {None})
    return out


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, Tensor]],
    stacked: Mapping[str, tuple[str, Any]],
    skip: Callable[[str], bool] = lambda name: False,
    remap: Callable[[str], tuple[str, Any] | None] = lambda name: None,
) -> None:
    params = dict(model.named_parameters())
    expected = _expected_shards(model)
    loaded: dict[str, set[Any]] = {}
    for name, tensor in weights:
        if skip(name):
            continue
        mapped = remap(name)
        target, shard = mapped if mapped is not None else (name, None)
        for theirs, (ours, shard_id) in stacked.items() if mapped is None else ():
            if f".{theirs}." in name:
                target, shard = name.replace(f".{theirs}.", f".{ours}."), shard_id
                break
        param = params.get(target)
        if param is None and name.endswith(".bias") and not tensor.any():
            # A zero bias for a layer that has none is the same model (GPTQ exporters write
            # one for every linear layer).
            continue
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from e
        got = loaded.setdefault(target, set())
        got |= expected.get(target, {None}) if shard is None else {shard}
    missing = sorted(
        p if s is None else f"{p}:{s}"
        for p, ids in expected.items()
        for s in ids - loaded.get(p, set())
    )
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
