"""Sliding-window attention and logit soft-capping in the torch backend (SDPA and the CPU C
decode kernel), against a dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from asyncllm.engine.kernels import cpu_decode_attention as cda
from asyncllm.engine.layers.attention import TorchAttentionBackend

from .test_attention import build_case


def windowed_reference(q, k_all, v_all, offset, scale, window, softcap):
    """q [n,Hq,D] at positions offset.., k/v [L,Hkv,D]: position i sees keys i-window+1..i
    (transformers' sliding-window mask), scores soft-capped as Gemma 2; float64."""
    hq, hkv = q.shape[1], k_all.shape[1]
    k = k_all.double().repeat_interleave(hq // hkv, dim=1)
    v = v_all.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    n, length = q.shape[0], k.shape[0]
    rows = torch.arange(n)[:, None] + offset
    cols = torch.arange(length)[None, :]
    allowed = cols <= rows
    if window:
        allowed &= cols > rows - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


MIXED = [(0, 7), (5, 1), (13, 4), (0, 1), (9, 1), (2, 9), (30, 1), (21, 6)]
DECODE = [(0, 1), (6, 1), (17, 1), (31, 1), (4, 1), (2, 1)]


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize(
    "window,softcap", [(5, None), (1, None), (8, 3.0), (None, 2.5), (64, None)]
)
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_window_and_softcap_match_dense_reference(
    kind, block_size, window, softcap, path, monkeypatch
):
    if path == "torch":
        monkeypatch.setenv("ASYNCLLM_CPU_ATTENTION", "torch")
    elif cda.load() is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    gen = torch.Generator().manual_seed(hash((kind, block_size, window, softcap)) % 2**31)
    specs = MIXED if kind == "mixed" else DECODE
    q, k, v, cache, meta, full, _ = build_case(gen, specs, 8, 2, 32, block_size, 0)
    q = q * 3  # sharper scores: the window and the cap change the output visibly
    scale = 1 / math.sqrt(32)
    out = TorchAttentionBackend().forward(
        q, k, v, cache, meta, scale, sliding_window=window, logits_soft_cap=softcap
    )
    plain = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, scale)
    for b, (cached, new) in enumerate(specs):
        a = meta.query_start_loc_cpu[b]
        k_all, v_all = full[b]
        ref = windowed_reference(q[a : a + new], k_all, v_all, cached, scale, window, softcap)
        torch.testing.assert_close(out[a : a + new].double(), ref, atol=1e-5, rtol=1e-5)
    if window is not None and window < 20 or softcap:
        # The test can fail: the window (or cap) made a difference somewhere.
        assert not torch.allclose(out, plain, atol=1e-3)


def test_blocks_wholly_before_the_window_are_not_read(monkeypatch):
    """A windowed sequence's leading blocks may be freed: poison their table entries and their
    contents; the output must not change (and the C kernel must not call the id bad)."""
    gen = torch.Generator().manual_seed(5)
    specs = [(37, 1), (22, 1), (40, 1)]
    bs, window = 4, 9
    q, k, v, cache, meta, full, tables = build_case(gen, specs, 4, 2, 32, bs, 0)
    want = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, 0.2, sliding_window=window)
    poisoned = cache.clone()
    bt = meta.block_tables.clone()
    for b, (cached, _) in enumerate(specs):
        first = cached + 1 - window  # the first position the query sees
        for j in range(first // bs):
            poisoned[:, tables[b][j]] = float("nan")
            bt[b, j] = 10_000  # outside the cache
    meta.block_tables = bt
    for mode in ("auto", "torch"):
        monkeypatch.setenv("ASYNCLLM_CPU_ATTENTION", mode)
        got = TorchAttentionBackend().forward(
            q, k, v, poisoned.clone(), meta, 0.2, sliding_window=window
        )
        torch.testing.assert_close(got, want)


def test_prefill_chunk_over_a_freed_head():
    """A prompt chunk over a cached prefix longer than the window reads only the blocks its
    first query can see."""
    gen = torch.Generator().manual_seed(9)
    specs = [(30, 6)]
    bs, window = 4, 7
    q, k, v, cache, meta, full, tables = build_case(gen, specs, 4, 4, 16, bs, 0)
    want = windowed_reference(q, *full[0], 30, 0.25, window, None)
    first = 30 - window + 1
    for j in range(first // bs):
        cache[:, tables[0][j]] = float("nan")
        meta.block_tables[0, j] = 10_000
    out = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25, sliding_window=window)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
