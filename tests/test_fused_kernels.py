"""Fused RMSNorm / SiLU-and-mul / q-k norm + rotary kernels against the torch layers they replace
(under Triton's interpreter without CUDA): float32 must agree to float32 rounding, bf16 to
within one bf16 rounding."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from asyncllm.engine.kernels import fused  # noqa: E402
from asyncllm.engine.layers.activations import SiluAndMul  # noqa: E402
from asyncllm.engine.layers.norms import RMSNorm  # noqa: E402
from asyncllm.engine.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter rounds float32 -> bf16 by truncation, the GPU to nearest, and the kernels chain
# several roundings: bf16 allows a few ulps of the largest magnitude in play.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOL[dtype])
    else:
        # a chain of up to five roundings, each one ulp apart between truncation and nearest
        scale = 2**-6 if out.is_cuda else 2**-4
        worst = float((out.float() - ref.float()).abs().max())
        assert worst <= scale * float(ref.float().abs().max()), worst


def _torch_ref(fn):
    # the layers' torch paths: layers built without fused ops (kernel_paths gives a model its
    # ops at construction; these test layers have none)
    return fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g))
    x = (torch.randn(5, hidden, generator=g) * 3).to(DEVICE, dtype)
    res = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    for r in (None, res):
        ref_out, ref_res = _torch_ref(lambda r=r: norm(x, r))
        out, new_res = fused.rms_norm(x, norm.weight, 1e-6, r)
        assert_close(out, ref_out, dtype)
        assert_close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = (torch.randn(7, 2 * 80) * 4).to(DEVICE, dtype)
    assert_close(fused.silu_and_mul(x), SiluAndMul()(x), dtype)


class _Cfg:
    rope_theta = 10000.0
    max_position_embeddings = 64

    def __init__(self, partial: float = 1.0):
        self.partial_rotary_factor = partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (64, 0.5)])
def test_qk_norm_rope_matches_layers(dtype, qk_norm, head_dim, partial):
    g = torch.Generator().manual_seed(head_dim + qk_norm)
    hq, hkv, t = 4, 2, 6
    cfg = _Cfg(partial)
    rope = RotaryEmbedding(head_dim, 64, cfg).to(DEVICE)
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, generator=g).to(DEVICE, dtype)
    pos = torch.tensor([0, 3, 9, 10, 33, 63], device=DEVICE)
    qn = RMSNorm(head_dim, 1e-6).to(DEVICE, dtype)
    kn = RMSNorm(head_dim, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        qn.weight.copy_(torch.randn(head_dim, generator=g))
        kn.weight.copy_(torch.randn(head_dim, generator=g))

    def ref():
        q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
        k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(t, hkv, head_dim)
        if qk_norm:
            q, k = qn.plain(q), kn.plain(k)
        return rope(pos, q, k)

    rq, rk = _torch_ref(ref)
    q, k = fused.qk_norm_rope(
        qkv,
        pos,
        rope.cos,
        rope.sin,
        hq,
        hkv,
        head_dim,
        qn.weight if qk_norm else None,
        kn.weight if qk_norm else None,
        1e-6,
    )
    assert_close(q, rq, dtype)
    assert_close(k, rk, dtype)
