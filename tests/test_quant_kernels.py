"""The quantized GEMM kernels (kernels/quant_gemm.py) against their float32 references, and the
GPU paths of the linear methods (repack at load, activation-order gather, the kernels) against
the dequantized dense layer. Without CUDA they run under TRITON_INTERPRET=1 on tiny shapes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from asyncllm.engine.kernels import quant_gemv  # noqa: E402
from asyncllm.engine.kernels.fp8_quant import per_token_fp8  # noqa: E402
from asyncllm.engine.kernels.quant_gemm import (  # noqa: E402
    DEQUANT_MIN_M,
    fp8_block_gemm,
    int4_gemm,
)
from asyncllm.engine.kernels.reference import (  # noqa: E402
    fp8_block_gemm_ref,
    int4_gemm_ref,
    per_token_fp8_ref,
)
from asyncllm.engine.layers.linear import MergedColumnParallelLinear  # noqa: E402
from asyncllm.engine.quantization import fp8 as fp8_mod  # noqa: E402
from asyncllm.engine.quantization import int4, int4_pack  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _int4_inputs(m, k, n, gs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=g)
    s = (torch.rand(k // gs, n, generator=g) * 0.05 + 0.01).half()
    z = torch.randint(0, 16, (k // gs, n), dtype=torch.uint8, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, qw, s, z)]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "m,k,n,gs",
    [(1, 64, 48, 32), (5, 128, 64, 64), (33, 128, 40, 128), (130, 128, 40, 64), (6, 192, 24, 96)],
)
def test_int4_gemm_matches_reference(m, k, n, gs, legacy):
    """m=1: the GEMV, 5, 33 and 130 (128-row tiles): the tl.dot kernel (group 96: steps of 32
    inputs); legacy: the first tile kernel."""
    x, qw, s, z = _int4_inputs(m, k, n, gs, torch.float32)
    out = int4_gemm(x, qw, s, z, gs, legacy=legacy)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, int4_gemm_ref(x, qw, s, z, gs)) < 1e-5


def test_fp8_block_gemm_matches_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g).to(FP8).to(DEVICE)
    si = (torch.rand(2, 3, generator=g) + 0.5).to(DEVICE)
    x = torch.randn(3, 96, generator=g).to(DEVICE)
    out = fp8_block_gemm(x, w, si, (32, 32))  # 48 rows: a partial last block of rows
    assert rel_err(out, fp8_block_gemm_ref(x, w, si, (32, 32))) < 1e-5
    per_row = torch.rand(48, 1, generator=g).to(DEVICE)
    out = fp8_block_gemm(x, w, per_row, (1, 96))
    assert rel_err(out, fp8_block_gemm_ref(x, w, per_row, (1, 96))) < 1e-5


def test_large_batches_take_the_dequantized_copy():
    """From DEQUANT_MIN_M rows W is written out by the dequant kernel and the GEMM is torch's."""
    x, qw, s, z = _int4_inputs(DEQUANT_MIN_M + 3, 64, 48, 32, torch.float32)
    assert rel_err(int4_gemm(x, qw, s, z, 32), int4_gemm_ref(x, qw, s, z, 32)) < 1e-6
    w = torch.randn(48, 96).to(FP8).to(DEVICE)
    si = (torch.rand(2, 3) + 0.5).to(DEVICE)
    x = torch.randn(DEQUANT_MIN_M, 96).to(DEVICE)
    assert (
        rel_err(fp8_block_gemm(x, w, si, (32, 32)), fp8_block_gemm_ref(x, w, si, (32, 32))) < 1e-6
    )


def test_per_token_fp8_matches_reference():
    x = torch.randn(6, 5000) * 3
    x[2] = 0  # an all-zero row: a tiny scale, zeros out
    x[4, 7] = 1e4  # an outlier sets its row's scale
    q, s = per_token_fp8(x.to(DEVICE))
    rq, rs = per_token_fp8_ref(x)
    assert q.dtype == FP8 and s.shape == (6, 1)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-6, atol=0)
    if DEVICE.type == "cpu":
        assert torch.equal(q.cpu().float(), rq.float())
    else:  # the GPU's float32 division may differ in the last bit: at most one e4m3 step
        diff = (q.cpu().float() - rq.float()).abs()
        assert (diff <= rq.float().abs() / 8 + 2**-9).all() and (diff > 0).float().mean() < 1e-3


def test_kernel_shape_errors():
    x, qw, s, z = _int4_inputs(6, 64, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="do not fit together"):
        int4_gemm(x[:, :32], qw, s, z, 32)
    with pytest.raises(ValueError, match="do not fit together"):
        int4_gemm(x, qw, s, z[:1], 32)  # zeros of another shape than the scales
    s8, z8 = s.repeat(4, 1), z.repeat(4, 1)  # group size 8: the tl.dot kernels need 16 inputs
    with pytest.raises(ValueError, match="no K tile"):
        int4_gemm(x, qw, s8, z8, 8)
    with pytest.raises(ValueError, match="no K tile"):
        int4_gemm(x, qw, s8, z8, 8, legacy=True)
    # the GEMV (up to GEMV_MAX_M rows) takes it: a step of one word row
    out = int4_gemm(x[:2], qw, s8, z8, 8)
    assert rel_err(out, int4_gemm_ref(x[:2], qw, s8, z8, 8)) < 1e-5


# ---- the small-batch kernels (kernels/quant_gemv.py) ----------------------------------------------
@pytest.mark.parametrize(
    "m,k,n,gs",
    [(1, 1024, 40, 128), (2, 512, 300, 64), (3, 256, 72, 32), (4, 256, 8, 256), (1, 384, 16, 96)],
)
def test_int4_gemv_matches_reference(m, k, n, gs, monkeypatch):
    """Every row count of the GEMV (1, 2, 4-row programs; rows past M masked), N not a multiple
    of the tile, K splits of several steps, and one group spanning the whole K. The engine sends
    it single rows only (GEMV_MAX_M, set on the H200) and up to 4 rows for groups under 16
    inputs; its multi-row programs are checked here with the limit raised."""
    monkeypatch.setattr(quant_gemv, "GEMV_MAX_M", 4)
    x, qw, s, z = _int4_inputs(m, k, n, gs, torch.float32, seed=m)
    plan = quant_gemv.int4_plan(m, n, k, gs, x.device)
    assert plan.kernel == "gemv"
    out = int4_gemm(x, qw, s, z, gs)
    assert rel_err(out, int4_gemm_ref(x, qw, s, z, gs)) < 1e-5


def test_split_k_is_deterministic_and_resets_its_counters():
    """The last program of each tile sums the partials in split order, then zeroes its counter:
    a second call gives the same bits, and the counters are all zero between calls."""
    x, qw, s, z = _int4_inputs(1, 1024, 48, 128, torch.float32, seed=3)
    assert quant_gemv.int4_plan(1, 48, 1024, 128, x.device).split > 1
    first = int4_gemm(x, qw, s, z, 128)
    assert int(quant_gemv.workspace(x.device).counters.abs().sum()) == 0
    assert torch.equal(first, int4_gemm(x, qw, s, z, 128))


@pytest.mark.parametrize(
    "m,k,n,block",
    [(1, 512, 40, None), (2, 1000, 24, None), (3, 300, 48, None), (4, 256, 64, (32, 64))],
)
def test_fp8_gemv_matches_reference(m, k, n, block):
    """W8A16: per-channel scales ([1, N], the _scaled_mm layout; K not a multiple of the step)
    and block scales."""
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g).to(FP8)
    if block is None:
        sc = torch.rand(1, n, generator=g) + 0.5
        ref_s, ref_block = sc.reshape(n, 1), (1, k)
    else:
        sc = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) + 0.5
        ref_s, ref_block = sc, block
    x = torch.randn(m, k, generator=g)
    out = quant_gemv.fp8_gemv(x.to(DEVICE), w.to(DEVICE), sc.to(DEVICE), block)
    assert rel_err(out.cpu(), fp8_block_gemm_ref(x, w, ref_s, ref_block)) < 1e-5


def test_fp8_small_batches_take_the_gemv(monkeypatch):
    """fp8_block_gemm runs the GEMV up to FP8_GEMV_MAX_M rows and the tile kernel above."""
    calls = []
    real = quant_gemv.fp8_gemv
    monkeypatch.setattr(quant_gemv, "fp8_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = torch.randn(32, 64).to(FP8).to(DEVICE)
    si = (torch.rand(1, 2) + 0.5).to(DEVICE)
    for m in (1, quant_gemv.FP8_GEMV_MAX_M, quant_gemv.FP8_GEMV_MAX_M + 1):
        x = torch.randn(m, 64).to(DEVICE)
        out = fp8_block_gemm(x, w, si, (32, 32))
        assert rel_err(out, fp8_block_gemm_ref(x, w, si, (32, 32))) < 1e-5
    assert calls == [1, quant_gemv.FP8_GEMV_MAX_M]


# ---- the methods' kernel paths, layer by layer --------------------------------------------------
def _merged(config, k=64, parts=(32, 32), dtype=torch.float32):
    torch.set_default_dtype(dtype)
    try:
        layer = MergedColumnParallelLinear(
            k, list(parts), quant_config=config, prefix="mlp.gate_up_proj"
        )
    finally:
        torch.set_default_dtype(torch.float32)
    return layer.to(DEVICE)


def _force_kernel(monkeypatch):
    """On the CPU, take the CUDA path of the methods (the kernels run in the interpreter)."""
    monkeypatch.setattr(int4.Int4LinearMethod, "uses_kernel", lambda self, device: True)


@pytest.mark.parametrize("fmt", ["gptq", "gptq-desc_act", "awq"])
def test_int4_layer_kernel_path_matches_dequantized(fmt, monkeypatch):
    if DEVICE.type == "cpu":
        _force_kernel(monkeypatch)
    gs = 32
    if fmt.startswith("gptq"):
        cfg = int4.GPTQConfig({"bits": 4, "group_size": gs, "desc_act": fmt.endswith("act"),
                               "sym": False})  # fmt: skip
    else:
        cfg = int4.AWQConfig({"bits": 4, "group_size": gs})
    layer = _merged(cfg)
    order = torch.randperm(64) if fmt.endswith("act") else None
    dense = []
    for shard in (0, 1):
        w = torch.randn(32, 64)
        qw = int4_pack.quantize_int4(w, gs, desc_act=order is not None, order=order)
        stored = int4_pack.to_gptq(qw) if fmt.startswith("gptq") else int4_pack.to_awq(qw)
        for name, t in stored.items():
            p = getattr(layer, name)
            p.weight_loader(p, t.to(DEVICE), shard)
        dense.append(qw.dequantize())
    layer.process_weights_after_loading()
    assert not hasattr(layer, "qweight") and hasattr(layer, "w4_qweight")
    assert (layer.w4_perm is not None) == fmt.endswith("act")
    x = torch.randn(3, 64).to(DEVICE)
    ref = x.float().cpu() @ torch.cat(dense).t()
    assert rel_err(layer(x).cpu(), ref) < 1e-5


@pytest.mark.parametrize("kind", ["channel", "block"])
def test_fp8_layer_kernel_path_matches_dequantized(kind, monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setattr(fp8_mod, "fp8_matmul_supported", lambda device: True)
    if kind == "block":
        cfg = fp8_mod.Fp8Config({"weight_block_size": [32, 32]})
    else:
        cfg = fp8_mod.Fp8Config(online=True)
    layer = _merged(cfg)
    ws = [torch.randn(32, 64) for _ in range(2)]
    dense = []
    for shard, w in enumerate(ws):
        if kind == "block":
            s = w.reshape(1, 32, 2, 32).abs().amax((1, 3)) / 448
            q = (w.reshape(1, 32, 2, 32) / s[:, None, :, None]).to(FP8).reshape(32, 64)
            layer.weight.weight_loader(layer.weight, q.to(DEVICE), shard)
            p = layer.weight_scale_inv
            p.weight_loader(p, s.to(DEVICE), shard)
            dense.append(fp8_block_gemm_ref(torch.eye(64), q, s, (32, 32)).t())
        else:
            layer.weight.weight_loader(layer.weight, w.to(DEVICE), shard)
            q, s = per_token_fp8_ref(w)
            dense.append(q.float() * s)
    layer.process_weights_after_loading()
    assert layer.fp8_weight.dtype == FP8
    x = torch.randn(3, 64).to(DEVICE)
    ref = x.float().cpu() @ torch.cat(dense).t()
    # float32 model: the Triton W8A16 kernel (no activation quantization), exact up to order
    assert rel_err(layer(x).cpu(), ref) < 1e-5


# ---- the GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300, 2048])
@pytest.mark.parametrize("gs", [32, 128])
def test_int4_gemm_gpu_bf16(m, gs):
    x, qw, s, z = _int4_inputs(m, 4096, 1536, gs, torch.bfloat16, seed=m)
    out = int4_gemm(x, qw, s, z, gs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, int4_gemm_ref(x, qw, s, z, gs)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 33, 512, 2048])
def test_fp8_block_gemm_gpu_bf16(m):
    w = torch.randn(2048, 1024, device="cuda").to(FP8)
    si = torch.rand(16, 8, device="cuda") * 0.01
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    out = fp8_block_gemm(x, w, si, (128, 128))
    assert rel_err(out, fp8_block_gemm_ref(x, w, si, (128, 128))) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 5, 48, 512])
def test_fp8_w8a8_layer_gpu(m):
    """bf16 on Hopper: the W8A16 GEMV up to FP8_GEMV_MAX_M rows, above it per-token activation
    quantization and _scaled_mm."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmul needs compute capability 8.9")
    layer = _merged(fp8_mod.Fp8Config(online=True), k=1024, parts=(512, 512), dtype=torch.bfloat16)
    ws = [torch.randn(512, 1024, device="cuda") * 0.02 for _ in range(2)]
    for shard, w in enumerate(ws):
        layer.weight.weight_loader(layer.weight, w.to(torch.bfloat16), shard)
    layer.process_weights_after_loading()
    assert layer.fp8_scale.shape == (1, 1024)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    wq, wsc = per_token_fp8_ref(torch.cat(ws).to(torch.bfloat16))
    if m <= quant_gemv.FP8_GEMV_MAX_M:  # W8A16: x as it is
        ref = x.float() @ (wq.float() * wsc).t()
    else:
        xq, xs = per_token_fp8_ref(x)
        ref = (xq.float() * xs) @ (wq.float() * wsc).t()
    assert rel_err(layer(x), ref) < 1e-2
    assert rel_err(layer(x), x.float() @ torch.cat(ws).t()) < 0.08  # and it is the layer


# Llama-3-8B's linears (N, K): merged q/k/v, gate/up, down, o
LLAMA_LINEARS = [(6144, 4096), (28672, 4096), (4096, 14336), (4096, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("n,k", LLAMA_LINEARS)
def test_int4_small_batch_gpu_real_sizes(m, n, k):
    """The GEMV / tl.dot kernels at the benchmark's sizes against the float32 reference, and
    against the first tile kernel (legacy)."""
    x, qw, s, z = _int4_inputs(m, k, n, 128, torch.bfloat16, seed=m + n)
    ref = int4_gemm_ref(x, qw, s, z, 128)
    out = int4_gemm(x, qw, s, z, 128)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, int4_gemm(x, qw, s, z, 128, legacy=True)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("n,k", LLAMA_LINEARS)
def test_fp8_gemv_gpu_real_sizes(m, n, k):
    w = (torch.randn(n, k, device="cuda") * 4).to(FP8)
    sc = torch.rand(1, n, device="cuda") * 0.01 + 0.001
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = quant_gemv.fp8_gemv(x, w, sc, None)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, fp8_block_gemm_ref(x, w, sc.reshape(n, 1), (1, k))) < 1e-2
    blocks = torch.rand(n // 128, k // 128, device="cuda") * 0.01
    out = quant_gemv.fp8_gemv(x, w, blocks, (128, 128))
    assert rel_err(out, fp8_block_gemm_ref(x, w, blocks, (128, 128))) < 1e-2


@pytest.mark.gpu
def test_split_k_in_a_cuda_graph():
    """The split-K tickets under graph replay: each replay sums its own partials (the counters
    are back to zero after every launch), bitwise equal to the eager call."""
    n, k = 4096, 14336
    x, qw, s, z = _int4_inputs(1, k, n, 128, torch.bfloat16, seed=5)
    w8 = torch.randn(n, k, device="cuda").to(FP8)
    sc = torch.rand(1, n, device="cuda") * 0.01
    assert quant_gemv.int4_plan(1, n, k, 128, x.device).split > 1
    quant_gemv.reserve(x.device)
    eager = (int4_gemm(x, qw, s, z, 128), quant_gemv.fp8_gemv(x, w8, sc, None))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = (int4_gemm(x, qw, s, z, 128), quant_gemv.fp8_gemv(x, w8, sc, None))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[0], eager[0]) and torch.equal(outs[1], eager[1])
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(outs[0], int4_gemm_ref(x, qw, s, z, 128)) < 1e-2
    assert int(quant_gemv.workspace(x.device).counters.abs().sum()) == 0
