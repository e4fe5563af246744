"""The CPU fused kernels (asyncllm.engine.kernels.cpu_fused) against the layers' torch ops: many
shapes, odd sizes, strided inputs; the routing (kernel_paths.select_fused_ops) and its switch; the fallback without
a compiler; and the engine's greedy tokens with the kernels on and off."""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn.functional as F

from asyncllm.engine.kernel_paths import select_fused_ops
from asyncllm.engine.kernels import cpu_fused as cf
from asyncllm.engine.layers.activations import SiluAndMul
from asyncllm.engine.layers.attention import write_kv_cache
from asyncllm.engine.layers.norms import RMSNorm
from asyncllm.engine.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module")
def lib():
    cf.reset()
    if cf.load() is None:
        pytest.skip("no C compiler: the kernels cannot be built here")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_routing_and_switch(lib, monkeypatch):
    """Chosen once per device and dtype (asyncllm.engine.kernel_paths): C for float32 on the CPU."""
    assert select_fused_ops("cpu", torch.float32) is cf
    assert select_fused_ops("cpu", torch.bfloat16) is None
    assert select_fused_ops("cpu", torch.float64) is None
    monkeypatch.setenv("ASYNCLLM_CPU_FUSED", "0")
    assert select_fused_ops("cpu", torch.float32) is None


@pytest.mark.parametrize("rows,cols", [(1, 8), (7, 33), (64, 576), (3, 1), (300, 1000), (0, 16)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(lib, rows, cols, with_residual, strided):
    g = gen(rows * 1000 + cols)
    norm = RMSNorm(cols, eps=1e-5, ops=cf)
    norm.weight.data = torch.randn(cols, generator=g)
    torch_norm = RMSNorm(cols, eps=1e-5)  # the layer's torch ops, for the reference
    torch_norm.weight.data = norm.weight.data
    if strided:  # column slices of wider rows, as views of a projection are
        x = torch.randn(rows, cols + 7, generator=g)[:, 3 : 3 + cols]
        res = torch.randn(rows, cols + 5, generator=g)[:, :cols] if with_residual else None
    else:
        x = torch.randn(rows, cols, generator=g) * 3
        res = torch.randn(rows, cols, generator=g) if with_residual else None
    out, new_res = norm(x, res)
    ref, ref_res = torch_norm(x, res)
    assert out.shape == ref.shape and new_res.shape == ref_res.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_res, ref_res)  # the add is one float32 rounding either way


def test_rms_norm_direct_checks(lib):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError):
        cf.rms_norm(x, torch.ones(15), 1e-6)
    with pytest.raises(ValueError):
        cf.rms_norm(x, torch.ones(16), 1e-6, torch.zeros(4, 15))
    with pytest.raises(ValueError):
        cf.rms_norm(x.double(), torch.ones(16), 1e-6)
    out, res = cf.rms_norm(x, torch.ones(16), 1e-6)
    assert res is x


@pytest.mark.parametrize("rows,d", [(1, 1), (5, 17), (64, 1536), (130, 600), (0, 4)])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(lib, rows, d, strided):
    g = gen(rows * 7 + d)
    if strided:
        x = torch.randn(rows, 2 * d + 9, generator=g)[:, 4 : 4 + 2 * d] * 5
    else:
        x = torch.randn(rows, 2 * d, generator=g) * 5
    out = SiluAndMul(cf)(x)
    ref = SiluAndMul()(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_silu_and_mul_extremes(lib):
    gate = torch.tensor([[-1000.0, -100.0, -88.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 88.0, 100.0, 1e4]])
    x = torch.cat([gate, torch.full_like(gate, 1.5)], dim=1)
    out = cf.silu_and_mul(x)
    ref = F.silu(gate) * 1.5
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-30)


def _rope(head_dim: int, partial: float = 1.0, theta: float = 10000.0) -> RotaryEmbedding:
    cfg = types.SimpleNamespace(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": theta,
            "partial_rotary_factor": partial,
        }  # fmt: skip
    )
    return RotaryEmbedding(head_dim, 4096, cfg)


def _torch_qk(qkv, positions, rope, hq, hkv, d, qn=None, kn=None):
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(-1, hq, d), k.reshape(-1, hkv, d)
    if qn is not None:
        q, k = qn.plain(q), kn.plain(k)
    return rope(positions, q, k)


@pytest.mark.parametrize(
    "t,hq,hkv,d,partial",
    [(1, 1, 1, 2, 1.0), (7, 9, 3, 64, 1.0), (64, 9, 3, 64, 1.0), (33, 8, 2, 128, 1.0),
     (5, 4, 4, 48, 0.5), (200, 16, 8, 64, 1.0), (3, 6, 2, 32, 0.25), (0, 4, 2, 16, 1.0)],
)  # fmt: skip
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_rope_in_place(lib, t, hq, hkv, d, partial, qk_norm):
    g = gen(t * 131 + hq * 17 + d)
    rope = _rope(d, partial)
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(t, width + 3, generator=g)[:, :width] * 2  # rows wider than q|k|v
    positions = torch.randint(0, 4096, (t,), generator=g, dtype=torch.int64)
    qn = kn = None
    if qk_norm:
        qn, kn = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
        qn.weight.data, kn.weight.data = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ref_q, ref_k = _torch_qk(qkv.clone(), positions, rope, hq, hkv, d, qn, kn)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    q, k = cf.qk_norm_rope(
        qkv, positions.to(torch.int32), rope.cos, rope.sin, hq, hkv, d,
        qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6,
    )  # fmt: skip
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d)
    assert q.data_ptr() == qkv.data_ptr()  # in place: views of the projection
    if qk_norm:
        torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
    else:  # the same float32 multiplies and adds as torch, in the same order
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)


def test_qk_norm_rope_checks(lib):
    rope = _rope(16)
    qkv = torch.randn(2, 4 * 16)
    with pytest.raises(IndexError):
        cf.qk_norm_rope(qkv, torch.tensor([0, 4096]), rope.cos, rope.sin, 2, 1, 16)
    with pytest.raises(ValueError):
        cf.qk_norm_rope(qkv[:, :40], torch.tensor([0, 1]), rope.cos, rope.sin, 2, 1, 16)
    with pytest.raises(ValueError):
        cf.qk_norm_rope(qkv, torch.tensor([0, 1]), rope.cos, rope.sin, 2, 1, 8)


@pytest.mark.parametrize("t,hkv,d,block_size", [(1, 1, 8, 1), (64, 3, 64, 16), (37, 2, 128, 32)])
def test_write_kv_cache(lib, t, hkv, d, block_size):
    g = gen(t + hkv + d)
    num_blocks = -(-t // block_size) + 3
    qkv = torch.randn(t, (4 * hkv + 2 * hkv) * d, generator=g)
    k = qkv[:, 4 * hkv * d : 5 * hkv * d].view(t, hkv, d)  # strided views, as in the model
    v = qkv[:, 5 * hkv * d :].view(t, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[:: max(1, t // 4)] = -1  # padding rows write nothing
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=g)
    want = cache.clone()
    write_kv_cache(k, v, want, slots)  # the torch ops
    write_kv_cache(k, v, cache, slots, cf)
    assert torch.equal(cache, want)


def test_write_kv_cache_checks(lib):
    cache = torch.zeros(2, 2, 4, 1, 8)
    k = torch.randn(2, 1, 8)
    with pytest.raises(IndexError):
        cf.write_kv_cache(k, k, cache, torch.tensor([0, 8]))
    assert not cf.write_kv_cache(k.double(), k.double(), cache, torch.tensor([0, 1]))
    assert not cf.write_kv_cache(k, k, cache.transpose(3, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_failed_build_falls_back_to_torch(monkeypatch, tmp_path, caplog, cc):
    monkeypatch.setenv("ASYNCLLM_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("ASYNCLLM_CC", cc)
    cf.reset()
    try:
        x, r = torch.randn(4, 32), torch.randn(4, 32)
        with caplog.at_level(logging.INFO, logger=cf.__name__):
            assert all(select_fused_ops("cpu", torch.float32) is None for _ in range(3))
            norm = RMSNorm(32, ops=select_fused_ops("cpu", torch.float32))
            out = [norm(x, r) for _ in range(3)][-1]
        assert sum("unavailable" in rec.message for rec in caplog.records) == 1
        s = x + r
        torch.testing.assert_close(out[0], s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        cf.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama3_scaled_untied"])
def test_engine_greedy_tokens_same_with_and_without(lib, tiny_model_dirs, monkeypatch, arch):
    """The whole CPU engine (prefill, chunked prefill and decode) with the fused kernels on and
    off (the switch read once, when an engine is built): the same greedy tokens."""
    from asyncllm import LLM, SamplingParams

    def build():
        return LLM(tiny_model_dirs[arch], max_num_batched_tokens=64, enable_prefix_caching=False)

    llm = build()
    prompts = [{"prompt_token_ids": [(7 * i + j) % 90 + 3 for j in range(n)]}
               for i, n in enumerate([3, 17, 40, 1, 70])]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    calls = []
    real = cf.rms_norm
    monkeypatch.setattr(cf, "rms_norm", lambda *a: calls.append(1) or real(*a))
    on = run()
    assert calls  # the fused path ran
    monkeypatch.setenv("ASYNCLLM_CPU_FUSED", "0")
    llm = build()
    n = len(calls)
    off = run()
    assert len(calls) == n  # and now it did not
    assert on == off
