"""The oneDNN-prepacked CPU linear layers compute what F.linear computes, and the CPU engine uses
them (every greedy test against transformers runs through them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asyncllm.engine.layers.cpu_linear import PackedLinear, bucket_rows
from asyncllm.engine.layers.linear import LinearBase

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build"
)


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 64), (0, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    got = PackedLinear(w, b)(x)
    want = F.linear(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pointwise", [True, False])
def test_packed_linear_paths_and_strided_inputs(pointwise, monkeypatch):
    """Both oneDNN paths (dense-in/out `_linear_pointwise`, and `mkldnn_linear` where torch lacks
    it), on a strided input (a column slice, as q/k/v views are) and a batch of 64."""
    if not pointwise:
        monkeypatch.setattr("asyncllm.engine.layers.cpu_linear._pointwise_available", lambda: False)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    layer = PackedLinear(w, b)
    assert layer.pointwise is (pointwise and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    for x in (torch.randn(64, 100, generator=g)[:, 3:51], torch.randn(5, 48, generator=g)):
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_cpu_engine_runs_on_packed_linears(tiny_model_dirs):
    """The dense linear method packs every linear layer after loading (its
    process_weights_after_loading) and drops the dense copy; a tied head packs a copy of the
    embedding, which keeps its dense weight."""
    from asyncllm import LLM

    tied = LLM(tiny_model_dirs["llama"]).llm_engine.runner.model
    layer = tied.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.packed, PackedLinear)
    assert isinstance(layer.mlp.down_proj.packed, PackedLinear)
    assert "weight" not in layer.mlp.down_proj._parameters  # replaced, not duplicated
    assert tied.lm_head.tied and isinstance(tied.lm_head.packed, PackedLinear)
    assert tied.model.embed_tokens.weight.layout == torch.strided  # the embedding stays dense
    untied = LLM(tiny_model_dirs["llama3_scaled_untied"]).llm_engine.runner.model
    assert isinstance(untied.lm_head.packed, PackedLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in untied.modules())
    linears = [m for m in untied.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * untied.config.num_hidden_layers
    assert all(isinstance(m.packed, PackedLinear) for m in linears)


def test_row_buckets_bound_the_gemm_shapes():
    """Issue 22 point 11: oneDNN and ideep cache one prepared GEMM per input row count; the
    buckets keep the row counts a weight sees up to 8192 to under 90, padding at most 12.5%."""
    sizes = [bucket_rows(m) for m in range(1, 8193)]
    assert sizes[:16] == list(range(1, 17))  # small decode batches: exact
    assert all(m <= b <= m * 1.125 for m, b in zip(range(1, 8193), sizes, strict=True))
    assert sizes == sorted(sizes)
    assert len(set(sizes)) < 90


@pytest.mark.parametrize("m", [17, 37, 65, 301])
def test_padded_rows_do_not_change_the_result(m):
    torch.manual_seed(m)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(m, 32)
    y = PackedLinear(w, b)(x)
    assert y.shape == (m, 48)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
