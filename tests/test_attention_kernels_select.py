"""The triton backend's decode/prefill kernel choice (ASYNCLLM_DECODE_ATTENTION /
ASYNCLLM_PREFILL_ATTENTION) and FlashAttention-4 against the float32 reference where it imports.

The selection tests run anywhere (FA4 is absent on the CPU: it must fall back, not fail); the FA4
numerics and its CUDA-graph capture are marked gpu and skip without flash_attn.cute.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from asyncllm.engine import kernel_paths  # noqa: E402
from asyncllm.engine.kernels import fa4_attention  # noqa: E402
from asyncllm.engine.kernels.cache_write import write_kv_cache  # noqa: E402
from asyncllm.engine.kernels.reference import paged_attention_ref  # noqa: E402
from asyncllm.engine.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.test_kernels import _meta, assert_close, make_case  # noqa: E402


def test_default_kernels_are_triton(monkeypatch):
    # v1 decode by default: the balanced split (v2) was slower at batch 1 in its one H200 run
    monkeypatch.delenv("ASYNCLLM_DECODE_ATTENTION", raising=False)
    monkeypatch.delenv("ASYNCLLM_PREFILL_ATTENTION", raising=False)
    assert kernel_paths.select_cuda_attention_kernels("cpu") == ("triton-v1", "triton")


def test_v1_decode_selectable(monkeypatch):
    monkeypatch.setenv("ASYNCLLM_DECODE_ATTENTION", "triton-v1")
    assert kernel_paths.select_cuda_attention_kernels("cpu") == ("triton-v1", "triton")
    backend = TritonAttentionBackend(decode="triton-v1")
    assert backend.name == "triton(decode=triton-v1, prefill=triton)"


def test_fa4_falls_back_where_it_cannot_run(monkeypatch, caplog):
    if fa4_attention.available():
        pytest.skip("flash_attn.cute imports here: nothing to fall back from")
    monkeypatch.setenv("ASYNCLLM_DECODE_ATTENTION", "fa4")
    monkeypatch.setenv("ASYNCLLM_PREFILL_ATTENTION", "FA4")
    with caplog.at_level("WARNING"):
        assert kernel_paths.select_cuda_attention_kernels("cpu") == ("triton-v1", "triton")
    assert "FlashAttention-4" in caplog.text


def test_bad_kernel_names_are_refused(monkeypatch):
    monkeypatch.setenv("ASYNCLLM_DECODE_ATTENTION", "flashinfer")
    with pytest.raises(ValueError, match="ASYNCLLM_DECODE_ATTENTION"):
        kernel_paths.select_cuda_attention_kernels("cpu")
    monkeypatch.setenv("ASYNCLLM_DECODE_ATTENTION", "triton")
    monkeypatch.setenv("ASYNCLLM_PREFILL_ATTENTION", "triton-v1")
    with pytest.raises(ValueError, match="ASYNCLLM_PREFILL_ATTENTION"):
        kernel_paths.select_cuda_attention_kernels("cpu")
    with pytest.raises(ValueError, match="decode attention kernel"):
        TritonAttentionBackend(decode="fa3")


def test_v1_and_v2_backends_agree():
    c = make_case([90, 12, 5], [1, 1, 1], 8, 2, 64, 8, torch.bfloat16, seed=4)
    outs = []
    for decode in ("triton", "triton-v1"):
        cache = c["cache"].clone()
        outs.append(
            TritonAttentionBackend(decode=decode).forward(
                c["q"], c["k"], c["v"], cache, _meta(c, True), 0.125
            )
        )
    ref = paged_attention_ref(c["q"], cache, c["tables"], c["qsl"], c["seq_lens"], 0.125)
    for out in outs:
        assert_close(out, ref, torch.bfloat16)


needs_fa4 = pytest.mark.skipif(not fa4_attention.available(), reason="needs flash_attn.cute")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("hq,hkv,bs", [(16, 8, 16), (32, 8, 16), (16, 8, 128)])
def test_fa4_decode_and_prefill_match_reference(hq, hkv, bs):
    dtype = torch.bfloat16
    seq_lens = [1, 300, 1025, 64]
    for query_lens in ([1, 1, 1, 1], [1, 44, 1025, 3]):
        c = make_case(seq_lens, query_lens, hq, hkv, 128, bs, dtype, seed=hq + bs)
        write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
        meta = _meta(c, all(n == 1 for n in query_lens))
        if meta.decode_only:
            out = fa4_attention.decode(c["q"], c["cache"], c["tables"], c["seq_lens_t"], 0.088)
        else:
            out = fa4_attention.prefill(
                c["q"], c["cache"], c["tables"], c["qsl_t"], c["seq_lens_t"],
                meta.max_query_len, 0.088,
            )  # fmt: skip
        ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.088)
        assert_close(out, ref, dtype)


@pytest.mark.gpu
@needs_fa4
def test_fa4_decode_in_a_cuda_graph_with_padding_rows():
    # the graph runner's buckets pad with seq_len 0 rows: they must stay finite, the real rows
    # must follow the lengths copied in before each replay
    dtype = torch.bfloat16
    c = make_case([700, 33, 1], [1, 1, 1], 16, 8, 128, 16, dtype, seed=9)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    lens = torch.tensor([700, 33, 0, 0], dtype=torch.int32, device="cuda")
    tables = torch.zeros(4, c["tables"].shape[1], dtype=torch.int32, device="cuda")
    tables[:3] = c["tables"]
    q = torch.zeros(4, 16, 128, dtype=dtype, device="cuda")
    q[:3] = c["q"]
    fa4_attention.decode(q, c["cache"], tables, lens, 0.088)  # warm-up: compiles
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fa4_attention.decode(q, c["cache"], tables, lens, 0.088)
    for live in ([700, 33], [512, 20]):
        lens[:2] = torch.tensor(live, dtype=torch.int32)
        g.replay()
        torch.cuda.synchronize()
        ref = paged_attention_ref(q[:2], c["cache"], tables[:2], [0, 1, 2], live, 0.088)
        assert_close(out[:2], ref, dtype)
        assert torch.isfinite(out[2:]).all()
