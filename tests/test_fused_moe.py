"""The Triton fused-MoE kernel against the float32 torch reference (kernels/reference.py), under
Triton's interpreter without CUDA (tiny shapes) and on the GPU (model shapes, CUDA graphs)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from asyncllm.engine.kernels import fused_moe as fm  # noqa: E402
from asyncllm.engine.kernels.reference import fused_moe_ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)


def make_case(t, h, i, e, k, dtype=torch.float32, seed=0, experts_used=None, device=DEVICE):
    """Random inputs, drawn on the device (model-sized weights on the GPU); with experts_used,
    the router only ever picks from those experts (the others are empty)."""
    g = torch.Generator(device=device).manual_seed(seed)
    to = dict(device=device)
    x = torch.randn(t, h, generator=g, **to)
    w13 = torch.randn(e, 2 * i, h, generator=g, **to) / h**0.5
    w2 = torch.randn(e, h, i, generator=g, **to) / i**0.5
    logits = torch.randn(t, e, generator=g, **to)
    if experts_used is not None:
        mask = torch.full((e,), float("-inf"), **to)
        mask[list(experts_used)] = 0.0
        logits = logits + mask
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids.to(torch.int32)


def check(case, config=None, dtype=torch.float32):
    x, w13, w2, w, ids = case
    out = fm.fused_moe(x, w13, w2, w, ids, config=config)
    ref = fused_moe_ref(x, w13, w2, w, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    else:
        scale = float(ref.abs().max())
        assert float((out.float() - ref).abs().max()) <= 3e-2 * scale


@pytest.mark.parametrize(
    "t,h,i,e,k,used",
    [
        (1, 32, 16, 4, 2, None),  # one token (decode)
        (5, 48, 40, 7, 2, None),  # odd expert count, dims not multiples of the blocks
        (6, 32, 16, 3, 3, None),  # top-k = every expert
        (19, 32, 32, 16, 4, [1, 5, 9, 14]),  # most experts empty, some with > BLOCK_M rows
        (3, 32, 16, 1, 1, None),  # a single expert, top-1
    ],
)
def test_kernel_matches_reference(t, h, i, e, k, used):
    check(make_case(t, h, i, e, k, experts_used=used, seed=t), config=SMALL)


def test_kernel_default_config_and_bf16():
    # the H200 table's first row (BLOCK_M 16, BLOCK_K 128) with a hidden size below BLOCK_K
    check(make_case(4, 48, 32, 5, 2, dtype=torch.bfloat16), dtype=torch.bfloat16)
    check(make_case(4, 48, 32, 5, 2), config=dict(SMALL, BLOCK_M=32, GROUP_M=1))


def test_no_tokens():
    x, w13, w2, w, ids = make_case(0, 32, 16, 4, 2)
    assert fm.fused_moe(x, w13, w2, w, ids).shape == (0, 32)


def test_bad_shapes_are_refused():
    x, w13, w2, w, ids = make_case(2, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="do not fit"):
        fm.fused_moe(x, w13[:, :, :16], w2, w, ids)
    with pytest.raises(ValueError, match="\\[T, k\\]"):
        fm.fused_moe(x, w13, w2, w[:, :1], ids)
    with pytest.raises(ValueError, match="dtype"):
        fm.fused_moe(x.double(), w13, w2, w, ids)


@pytest.mark.parametrize("align", [fm.moe_align, fm.moe_align_torch], ids=["kernel", "torch"])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_groups_pairs_by_expert(block_m, align):
    g = torch.Generator().manual_seed(block_m)
    e, t, k = 6, 11, 2
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    ids[ids == 3] = 2  # expert 3 empty, duplicates are harmless for the sort
    sorted_ids, expert_ids, num_padded = align(ids.to(DEVICE), block_m, e)
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    n = int(num_padded)
    assert n % block_m == 0 and n <= sorted_ids.numel()
    assert expert_ids.numel() * block_m == sorted_ids.numel()
    flat = ids.reshape(-1)
    seen = []
    for b in range(n // block_m):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        real = rows[rows < t * k]
        assert len(real) > 0  # no block is all padding
        assert (flat[real.long()] == expert_ids[b]).all()
        seen += real.tolist()
    assert sorted(seen) == list(range(t * k))  # every pair exactly once
    # what lies past num_padded is unspecified: the GEMM kernels skip those blocks
    assert expert_ids[: n // block_m].tolist() == sorted(expert_ids[: n // block_m].tolist())


@pytest.mark.parametrize(
    "t,e,k,block_m", [(1, 128, 8, 16), (37, 60, 4, 32), (300, 8, 2, 64), (5, 3, 3, 16)]
)
def test_align_kernel_equals_torch_ops(t, e, k, block_m):
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int().to(DEVICE)
    got, ref = fm.moe_align(ids, block_m, e), fm.moe_align_torch(ids, block_m, e)
    n = int(ref[2])
    assert int(got[2]) == n
    assert torch.equal(got[0][:n], ref[0][:n])
    assert torch.equal(got[1][: n // block_m], ref[1][: n // block_m])


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,k", [(1, 128, 8), (9, 60, 4), (4, 3, 3), (6, 7, 1), (5, 16, 3)])
def test_topk_softmax_equals_torch(t, e, k, renormalize):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e)).to(DEVICE)
    w, ids = fm.topk_softmax(logits, k, renormalize)
    ref_w, ref_ids = torch.softmax(logits, -1).topk(k)
    if renormalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_config_table_and_override(tmp_path, monkeypatch):
    decode = fm.get_config(1, 128, 8)
    prefill = fm.get_config(8192, 128, 8)
    assert decode["BLOCK_M"] <= prefill["BLOCK_M"] and decode["BLOCK_M"] == 16
    path = tmp_path / "cfg.json"
    path.write_text(
        '{"1": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1}, '
        '"512": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}}'
    )
    monkeypatch.setenv("ASYNCLLM_MOE_CONFIG", str(path))
    assert fm.get_config(3, 128, 8)["BLOCK_N"] == 32
    assert fm.get_config(4000, 128, 8)["BLOCK_M"] == 64


@pytest.mark.parametrize("m", [1, 16, 64, 512, 8192])
def test_configs_fit_hopper_shared_memory_in_every_dtype(m):
    """The H200 failed to compile the float32 prefill tiles (240 KiB of stages against 227): the
    tables are written for 2-byte inputs, so float32 gets fewer stages or a shorter BLOCK_K."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cfg = fm.get_config(m, 8, 2, 1792, 4096, dtype)
        used = fm.gate_up_stage_bytes(cfg, dtype.itemsize) * cfg["num_stages"]
        assert used <= fm.SHARED_MEMORY_BUDGET, (m, dtype, cfg)
    # 2-byte configs keep the table's tiles
    assert fm.get_config(m, 8, 2, 1792, 4096, torch.bfloat16) == fm._default_config(m, 8, 2)


# ---- on the GPU ------------------------------------------------------------------------------------
QWEN3_30B = dict(h=2048, i=768, e=128, k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 64, 256, 1000, 4096])
def test_gpu_qwen3_30b_shape(t):
    c = QWEN3_30B
    check(
        make_case(t, c["h"], c["i"], c["e"], c["k"], dtype=torch.bfloat16, seed=t),
        dtype=torch.bfloat16,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("e,k,h,i", [(8, 2, 4096, 1792), (60, 4, 2048, 1408), (3, 3, 256, 96)])
def test_gpu_other_shapes_float32_and_bf16(e, k, h, i):
    for t in (1, 33, 300):
        check(make_case(t, h, i, e, k, seed=t), dtype=torch.float32)
        check(make_case(t, h, i, e, k, dtype=torch.bfloat16, seed=t), dtype=torch.bfloat16)
    check(make_case(200, h, i, e, k, experts_used=[0, e - 1] if k <= 2 else None))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    c = QWEN3_30B
    x, w13, w2, w, ids = make_case(32, c["h"], c["i"], c["e"], c["k"], dtype=torch.bfloat16)
    fm.fused_moe(x, w13, w2, w, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_moe(x, w13, w2, w, ids)
    for seed in (1, 2):
        x2, _, _, w_new, ids_new = make_case(
            32, c["h"], c["i"], c["e"], c["k"], dtype=torch.bfloat16, seed=seed
        )
        x.copy_(x2)
        w.copy_(w_new)
        ids.copy_(ids_new)
        graph.replay()
        ref = fused_moe_ref(x, w13, w2, w, ids)
        assert float((out.float() - ref).abs().max()) <= 3e-2 * float(ref.abs().max())
