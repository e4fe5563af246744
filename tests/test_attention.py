"""The torch attention backend against a dense float64 reference on random paged inputs."""

from __future__ import annotations

import math

import pytest
import torch

from asyncllm.engine.layers.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
)
from asyncllm.engine.layers.attention_backends import get_attention_backend


def dense_reference(q, k_all, v_all, offset, scale):
    """q [n,Hq,D] at positions offset.., k/v [L,Hkv,D]: causal softmax attention in float64."""
    hq, hkv = q.shape[1], k_all.shape[1]
    rep = hq // hkv
    k = k_all.double().repeat_interleave(rep, dim=1)
    v = v_all.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    n, length = q.shape[0], k.shape[0]
    allowed = torch.arange(length)[None, :] <= (torch.arange(n)[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def build_case(gen, specs, hq, hkv, d, block_size, pad_tokens):
    """specs: (cached_len, new_len) per sequence. Returns inputs, the cache, metadata and the
    full K/V of every sequence (cached + new) for the reference."""
    num_blocks = sum(-(-(c + n) // block_size) for c, n in specs) + 3
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen)
    # Block 0 stays reserved (padding's table entry); the rest are handed out shuffled.
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    qs, ks, vs, slots, tables, full = [], [], [], [], [], []
    qsl, lens = [0], []
    for cached, new in specs:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        k_all = torch.randn(total, hkv, d, generator=gen)
        v_all = torch.randn(total, hkv, d, generator=gen)
        for p in range(cached):  # the context is already in the cache
            cache[0, table[p // block_size], p % block_size] = k_all[p]
            cache[1, table[p // block_size], p % block_size] = v_all[p]
        qs.append(torch.randn(new, hq, d, generator=gen))
        ks.append(k_all[cached:])
        vs.append(v_all[cached:])
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(cached, total)
        ]
        tables.append(table)
        full.append((k_all, v_all))
        qsl.append(qsl[-1] + new)
        lens.append(total)
    if pad_tokens:
        # A padding sequence (as a CUDA-graph batch pads with): slot -1, block table of zeros.
        qs.append(torch.randn(pad_tokens, hq, d, generator=gen))
        ks.append(torch.randn(pad_tokens, hkv, d, generator=gen))
        vs.append(torch.randn(pad_tokens, hkv, d, generator=gen))
        slots += [-1] * pad_tokens
        tables.append([0])
        qsl.append(qsl[-1] + pad_tokens)
        lens.append(pad_tokens)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
        decode_only=all(b - a == 1 for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
    )
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, meta, full, tables


MIXED = [(0, 7), (5, 1), (13, 4), (0, 1), (9, 1), (2, 9)]
DECODE = [(0, 1), (6, 1), (17, 1), (31, 1), (4, 1)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_torch_backend_matches_dense_reference(kind, hq, hkv, d, block_size):
    gen = torch.Generator().manual_seed(hash((kind, hq, hkv, d, block_size)) % 2**31)
    specs = MIXED if kind == "mixed" else DECODE
    pad = 3 if kind == "mixed" else 1
    q, k, v, cache, meta, full, tables = build_case(gen, specs, hq, hkv, d, block_size, pad)
    assert meta.decode_only == (kind == "decode")
    before = cache.clone()
    scale = 1 / math.sqrt(d)
    out = TorchAttentionBackend().forward(q, k, v, cache, meta, scale)
    assert out.shape == q.shape

    for b, (cached, new) in enumerate(specs):
        a = meta.query_start_loc_cpu[b]
        k_all, v_all = full[b]
        ref = dense_reference(q[a : a + new], k_all, v_all, cached, scale)
        torch.testing.assert_close(out[a : a + new].double(), ref, atol=1e-5, rtol=1e-5)
        # The new K/V landed in this sequence's own slots.
        for p in range(cached, cached + new):
            blk, off = tables[b][p // block_size], p % block_size
            torch.testing.assert_close(cache[0, blk, off], k_all[p])
            torch.testing.assert_close(cache[1, blk, off], v_all[p])

    # Nothing else was written: padding (slot -1) and unowned slots keep their old contents.
    written = torch.zeros(cache.shape[1] * block_size, dtype=torch.bool)
    written[meta.slot_mapping[meta.slot_mapping >= 0]] = True
    flat_before = before.view(2, -1, hkv, d)
    flat_after = cache.view(2, -1, hkv, d)
    assert torch.equal(flat_before[:, ~written], flat_after[:, ~written])
    assert torch.isfinite(out).all()


def test_decode_rows_in_a_mixed_batch_use_the_same_path_as_decode_only():
    """Single-token sequences of a mixed step are batched; they must agree with decode-only."""
    gen = torch.Generator().manual_seed(7)
    specs = [(3, 1), (8, 1), (0, 5), (11, 1)]
    q, k, v, cache, meta, full, _ = build_case(gen, specs, 4, 2, 32, 4, 0)
    out = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, 0.2)
    for b, (cached, new) in enumerate(specs):
        a = meta.query_start_loc_cpu[b]
        ref = dense_reference(q[a : a + new], *full[b], cached, 0.2)
        torch.testing.assert_close(out[a : a + new].double(), ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_cache_is_close():
    gen = torch.Generator().manual_seed(3)
    q, k, v, cache, meta, full, _ = build_case(gen, MIXED, 8, 2, 64, 4, 0)
    out = TorchAttentionBackend().forward(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.bfloat16(), meta, 0.125
    )
    assert out.dtype == torch.bfloat16
    for b, (cached, new) in enumerate(MIXED):
        a = meta.query_start_loc_cpu[b]
        ref = dense_reference(q[a : a + new], *full[b], cached, 0.125)
        torch.testing.assert_close(out[a : a + new].double(), ref, atol=5e-2, rtol=5e-2)


def test_get_attention_backend():
    assert get_attention_backend("torch", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            get_attention_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("n,offset", [(1, 40), (5, 19), (16, 0)])
def test_grouped_query_chunk_attention_matches_expanded_heads(n, offset):
    """A GQA chunk behind a prefix (the CPU path folds each KV head's query heads into rows):
    the same as attending with the K/V heads repeated."""
    from asyncllm.engine.layers.attention import _attend

    torch.manual_seed(n)
    hq, hkv, d = 6, 2, 8
    q = torch.randn(n, hq, d)
    k, v = torch.randn(offset + n, hkv, d), torch.randn(offset + n, hkv, d)
    got = _attend(q, k, v, offset, 0.3) if offset else _attend(q, k, v, 0, 0.3, window=4)
    kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    want = _attend(q, kk, vv, offset, 0.3) if offset else _attend(q, kk, vv, 0, 0.3, window=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
