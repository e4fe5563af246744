"""The MoE layer (layers/moe.py) against transformers' own MoE blocks: routing, the grouped CPU
path, the loaders (per-expert, fused, tensor-parallel slices) and the quantization seam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asyncllm.engine.kernels.reference import fused_moe_ref
from asyncllm.engine.layers.moe import (
    FusedMoE,
    FusedMoEMethod,
    SparseMoeBlock,
    expert_weight_target,
    grouped_moe_torch,
    select_experts,
)

H, INTER, E = 32, 24, 5


def _hf_block(kind: str, norm_topk: bool = False):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    common = dict(hidden_size=H, num_experts_per_tok=2, hidden_act="silu")
    if kind == "mixtral":
        block = MixtralSparseMoeBlock(
            MixtralConfig(**common, intermediate_size=INTER, num_local_experts=E)
        )
    elif kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common,
            num_experts=E,
            moe_intermediate_size=INTER,
            shared_expert_intermediate_size=40,
            norm_topk_prob=norm_topk,
        )
        block = Qwen2MoeSparseMoeBlock(cfg)
    else:
        cfg = Qwen3MoeConfig(
            **common, num_experts=E, moe_intermediate_size=INTER, norm_topk_prob=norm_topk
        )
        block = Qwen3MoeSparseMoeBlock(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.eval()


def _checkpoint(hf, kind: str, per_expert: bool) -> list[tuple[str, torch.Tensor]]:
    """The block's tensors under the names a checkpoint gives them: per expert as save_pretrained
    writes them (Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2`), or transformers 5's fused
    in-memory layout (`mlp.experts.gate_up_proj`)."""
    sd = hf.state_dict()
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    out = [
        (f"model.layers.0.{block}.{k}", v) for k, v in sd.items() if not k.startswith("experts.")
    ]
    if per_expert:
        names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(E):
            gate, up = sd["experts.gate_up_proj"][e].chunk(2)
            for name, t in zip(names, (gate, up, sd["experts.down_proj"][e]), strict=True):
                out.append((f"model.layers.0.{block}.experts.{e}.{name}.weight", t))
    else:
        out += [
            (f"model.layers.0.mlp.experts.{n}", sd[f"experts.{n}"])
            for n in ("gate_up_proj", "down_proj")
        ]
    return out


class _Holder(nn.Module):
    """model.layers.0.mlp = the block, so checkpoint names resolve as in a model."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = block


def _ours_from_hf(hf, kind: str, renormalize: bool, per_expert: bool) -> SparseMoeBlock:
    from types import SimpleNamespace

    from asyncllm.engine.models.llama import _STACKED, MLP
    from asyncllm.engine.models.moe_common import _remap
    from asyncllm.engine.models.weights import load_weights

    shared = None
    if kind == "qwen2_moe":
        cfg = SimpleNamespace(hidden_size=H, intermediate_size=40, hidden_act="silu")
        shared = MLP(cfg, "model.layers.0.mlp.shared_expert", ops=None, quant_config=None)
    ours = SparseMoeBlock(
        H, E, 2, INTER, renormalize, shared, shared_expert_gate=shared is not None, prefix="mlp"
    )
    load_weights(_Holder(ours), _checkpoint(hf, kind, per_expert), _STACKED, remap=_remap)
    return ours.eval()


@pytest.mark.parametrize(
    "kind,norm_topk",
    [
        ("mixtral", True),
        ("qwen2_moe", False),
        ("qwen2_moe", True),
        ("qwen3_moe", True),
        ("qwen3_moe", False),
    ],
)
@pytest.mark.parametrize("per_expert", [True, False])
def test_block_matches_transformers(kind, norm_topk, per_expert):
    hf = _hf_block(kind, norm_topk)
    ours = _ours_from_hf(hf, kind, renormalize=norm_topk, per_expert=per_expert)
    x = torch.randn(1, 9, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x)[0]
        out = ours(x[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_select_experts_matches_transformers_routers():
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    x = torch.randn(7, H)
    for router, renorm in (
        (
            MixtralTopKRouter(
                MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=3)
            ),
            True,
        ),
        (
            Qwen2MoeTopKRouter(
                Qwen2MoeConfig(
                    hidden_size=H, num_experts=E, num_experts_per_tok=3, norm_topk_prob=False
                )
            ),
            False,
        ),
    ):
        nn.init.normal_(router.weight)
        logits, ref_w, ref_ids = router(x)
        w, ids = select_experts(logits, 3, renorm)
        assert w.dtype == torch.float32 and ids.dtype == torch.int32
        assert torch.equal(ids.long(), ref_ids)
        torch.testing.assert_close(w, ref_w.float())
    assert not torch.allclose(w.sum(-1), torch.ones(7))  # Qwen2-MoE: not renormalised


@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (13, 7, 3), (6, 3, 3), (20, 16, 1), (0, 4, 2)])
def test_grouped_torch_path_matches_reference(t, e, k):
    g = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, H, generator=g)
    w13, w2 = torch.randn(e, 2 * INTER, H, generator=g), torch.randn(e, H, INTER, generator=g)
    w, ids = torch.softmax(torch.randn(t, e, generator=g), -1).topk(k)
    out = grouped_moe_torch(x, w13, w2, w, ids.int())
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, w, ids), rtol=1e-4, atol=1e-4)


def test_grouped_path_runs_only_hit_experts(monkeypatch):
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b: calls.append(1) or real(a, b))
    x = torch.randn(4, H)
    ids = torch.tensor([[1, 6]] * 4, dtype=torch.int32)
    grouped_moe_torch(
        x, torch.randn(64, 2 * INTER, H), torch.randn(64, H, INTER), torch.ones(4, 2), ids
    )
    assert len(calls) == 4  # two experts hit of 64: one gate/up and one down each


def test_expert_weight_names():
    assert expert_weight_target("model.layers.3.mlp.experts.7.up_proj.weight") == (
        "model.layers.3.mlp.experts.w13_weight",
        ("w3", 7),
    )
    assert expert_weight_target("model.layers.0.mlp.experts.2.w2.weight") == (
        "model.layers.0.mlp.experts.w2_weight",
        ("w2", 2),
    )
    assert expert_weight_target("m.mlp.experts.0.gate_proj.weight_scale") == (
        "m.mlp.experts.w13_weight_scale",
        ("w1", 0),
    )
    assert expert_weight_target("m.mlp.experts.gate_up_proj") == ("m.mlp.experts.w13_weight", None)
    assert expert_weight_target("m.mlp.experts.down_proj.weight") == (
        "m.mlp.experts.w2_weight",
        None,
    )
    assert expert_weight_target("m.mlp.shared_expert.gate_proj.weight") is None
    assert expert_weight_target("m.mlp.gate.weight") is None


def test_missing_experts_are_reported():
    from asyncllm.engine.models.llama import _STACKED
    from asyncllm.engine.models.moe_common import _remap
    from asyncllm.engine.models.weights import load_weights

    hf = _hf_block("qwen3_moe", True)
    ckpt = [(n, t) for n, t in _checkpoint(hf, "qwen3_moe", True) if ".experts.3.up_proj" not in n]
    block = SparseMoeBlock(H, E, 2, INTER, True, prefix="mlp")
    with pytest.raises(ValueError, match="missing 1 tensors.*w13_weight:\\('w3', 3\\)"):
        load_weights(_Holder(block), ckpt, _STACKED, remap=_remap)


def _load(layer: FusedMoE, name: str, t: torch.Tensor, shard=None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, t, shard)


def test_tensor_parallel_slices():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, generator=g)
    w2 = torch.randn(E, H, INTER, generator=g)
    full = FusedMoE(E, 2, H, INTER)
    _load(full, "w13_weight", w13)
    _load(full, "w2_weight", w2)
    assert torch.equal(full.w13_weight, w13) and torch.equal(full.w2_weight, w2)
    for rank in range(2):
        part = FusedMoE(E, 2, H, INTER, tp_rank=rank, tp_size=2)
        for e in range(E):
            gate, up = w13[e].chunk(2)
            _load(part, "w13_weight", gate, ("w1", e))
            _load(part, "w13_weight", up, ("w3", e))
        _load(part, "w2_weight", w2)  # fused, sliced on its input dim
        half = INTER // 2
        sl = slice(rank * half, (rank + 1) * half)
        assert torch.equal(part.w13_weight[:, :half], w13[:, :INTER][:, sl])
        assert torch.equal(part.w13_weight[:, half:], w13[:, INTER:][:, sl])
        assert torch.equal(part.w2_weight, w2[:, :, sl])
    assert set(full.w13_weight.shard_ids) == {(s, e) for e in range(E) for s in ("w1", "w3")}
    with pytest.raises(ValueError, match="does not fit"):
        _load(full, "w2_weight", w2[0].T, ("w2", 0))
    with pytest.raises(ValueError, match="expert 9"):
        _load(full, "w2_weight", w2[0], ("w2", 9))
    with pytest.raises(ValueError, match="does not belong"):
        _load(full, "w2_weight", w2[0], ("w1", 0))
    with pytest.raises(ValueError, match="divisible"):
        FusedMoE(E, 2, H, INTER, tp_size=5)


def test_quantization_seam():
    """A format plugs in its own expert method: its parameters, loaders, post-load step and
    apply, through the same weight_loader protocol."""
    from asyncllm.engine.layers.linear import set_weight_attrs
    from asyncllm.engine.layers.moe import UnquantizedFusedMoEMethod

    class HalfScaled(FusedMoEMethod):
        name = "scaled"

        def create_weights(self, layer, num_experts, hidden_size, inter, params_dtype):
            UnquantizedFusedMoEMethod().create_weights(
                layer, num_experts, hidden_size, inter, params_dtype
            )
            scale = nn.Parameter(torch.ones(num_experts), requires_grad=False)

            def load_scale(param, t, shard_id=None):
                param.data[shard_id[1]] = t

            set_weight_attrs(
                scale, {"weight_loader": load_scale, "shard_ids": [("w2", e) for e in range(E)]}
            )
            layer.register_parameter("w2_weight_scale", scale)

        def process_weights_after_loading(self, layer):
            layer.folded = True

        def apply(self, layer, x, w, ids):
            out = grouped_moe_torch(x, layer.w13_weight, layer.w2_weight, w, ids)
            return out * layer.w2_weight_scale[0]

    class Config:
        name = "half"

        def get_moe_method(self, layer, prefix):
            assert prefix == "mlp.experts"
            return HalfScaled()

    block = SparseMoeBlock(H, E, 2, INTER, True, quant_config=Config(), prefix="mlp")
    names = {n for n, _ in block.experts.named_parameters()}
    assert names == {"w13_weight", "w2_weight", "w2_weight_scale"}
    nn.init.normal_(block.experts.w13_weight)
    nn.init.normal_(block.experts.w2_weight)
    x = torch.randn(3, H)
    before = block(x)
    # the checkpoint's per-expert scale names reach the method's own loader
    target, shard = expert_weight_target("mlp.experts.4.down_proj.weight_scale")
    assert target == "mlp.experts.w2_weight_scale" and shard == ("w2", 4)
    for e in range(E):
        _load(block.experts, "w2_weight_scale", torch.tensor(0.5), ("w2", e))
    block.experts.process_weights_after_loading()
    assert block.experts.folded
    torch.testing.assert_close(block(x), before * 0.5)

    class NoMoE:
        name = "nomoe"

    with pytest.raises(ValueError, match="no mixture-of-experts method"):
        FusedMoE(E, 2, H, INTER, quant_config=NoMoE())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_on_cuda_equals_the_cpu_path(dtype):
    """The CUDA path (routing kernel, sort kernel, fused GEMMs) against the grouped torch path."""
    hf = _hf_block("qwen2_moe", True)
    ours = _ours_from_hf(hf, "qwen2_moe", renormalize=True, per_expert=True)
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(x)
        ours.use_triton = ours.experts.use_triton = True  # what kernel_paths chooses on CUDA
        gpu = ours.to("cuda", dtype)(x.to("cuda", dtype)).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * float(ref.abs().max())
    torch.testing.assert_close(gpu, ref, rtol=tol, atol=tol)
