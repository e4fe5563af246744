"""Triton kernels against their float32 torch references on random paged inputs.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before any kernel
module is imported), on small shapes so the file stays fast; the larger sweeps are marked gpu.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from asyncllm.engine.kernels.cache_write import write_kv_cache  # noqa: E402
from asyncllm.engine.kernels.decode_attention import (  # noqa: E402
    choose_grid_splits,
    choose_num_splits,
    paged_decode_attention,
)
from asyncllm.engine.kernels.prefill_attention import (  # noqa: E402
    build_prefill_work,
    paged_prefill_attention,
)
from asyncllm.engine.kernels.reference import paged_attention_ref, write_kv_cache_ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 inputs: the reference is float32 on the same inputs; the kernel's error is the bf16 rounding
# of its output (and of the softmax weights fed to the tensor cores on the GPU).
TOL = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (4e-3, 1e-2), torch.float32: (2e-5, 1e-4)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "output has NaN (unwritten or bad masking)"
    rel, atol = TOL[dtype]
    err = rel_err(out, ref)
    worst = float((out.float() - ref).abs().max())
    assert err < rel and worst < atol, f"relative error {err:.2e}, max abs error {worst:.2e}"


def make_case(
    seq_lens: list[int],
    query_lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
):
    """A random paged batch: blocks scattered through a cache larger than needed, random context
    already cached, new tokens' K/V to be written at their slots."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq + [1])
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=g).to(dtype)
    t = sum(query_lens)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    slots = []
    qsl = [0]
    for b, (n, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        for p in range(n - ql, n):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
        qsl.append(qsl[-1] + ql)
    dev = DEVICE
    return dict(
        q=q.to(dev),
        k=k.to(dev),
        v=v.to(dev),
        cache=cache.to(dev),
        tables=tables.to(dev),
        slots=torch.tensor(slots, dtype=torch.int64, device=dev),
        qsl=qsl,
        qsl_t=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=seq_lens,
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
    )


# ---- cache write ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_cache_matches_reference_and_skips_padding(dtype):
    c = make_case([5, 17, 3], [2, 17, 1], hq=4, hkv=2, d=64, block_size=4, dtype=dtype, seed=0)
    slots = c["slots"].clone()
    slots[1] = -1  # a padding row writes nothing
    ours, ref = c["cache"].clone(), c["cache"].clone()
    write_kv_cache(c["k"], c["v"], ours, slots)
    write_kv_cache_ref(c["k"], c["v"], ref, slots)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, c["cache"])  # something was written


def test_write_kv_cache_strided_views_of_fused_qkv():
    # Models slice k and v out of one fused projection: rows are strided, heads contiguous.
    t, hkv, d = 6, 2, 64
    qkv = torch.randn(t, (4 + 2 * hkv) * d, device=DEVICE).to(torch.bfloat16)
    k = qkv[:, 4 * d : (4 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (4 + hkv) * d :].view(t, hkv, d)
    cache = torch.zeros(2, 4, 4, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    ref = cache.clone()
    slots = torch.tensor([3, 0, 15, 7, 8, 9], device=DEVICE)
    write_kv_cache(k, v, cache, slots)
    write_kv_cache_ref(k, v, ref, slots)
    assert torch.equal(cache, ref)


def test_write_kv_cache_rejects_bad_shapes():
    cache = torch.zeros(2, 4, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        write_kv_cache(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), cache, torch.zeros(3).long())
    with pytest.raises(ValueError, match="slot_mapping"):
        k = torch.zeros(3, 2, 64, device=DEVICE)
        write_kv_cache(k, k, cache, torch.zeros(2, dtype=torch.long, device=DEVICE))


# ---- decode -------------------------------------------------------------------------------------
DECODE_CASES = [
    # seq_lens, hq, hkv, d, block_size, num_splits (None = the launcher's choice)
    ([1, 7, 33], 4, 4, 64, 4, None),  # MHA, lengths not multiples of the block
    ([70, 5], 8, 2, 128, 16, 1),  # GQA 4, one split: direct output path
    ([40, 129, 2], 14, 2, 64, 8, 3),  # GQA 7 (Qwen2-0.5B), uneven splits, some empty
    ([3, 64], 16, 8, 128, 32, 16),  # Qwen3-0.6B's heads; more splits than tiles
    ([300, 3], 8, 2, 64, 16, 1),  # many tiles in one split: the running max moves
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_lens,hq,hkv,d,bs,splits", DECODE_CASES)
def test_decode_matches_reference(seq_lens, hq, hkv, d, bs, splits, dtype):
    c = make_case(seq_lens, [1] * len(seq_lens), hq, hkv, d, bs, dtype, seed=len(seq_lens) + d)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    out = torch.full_like(c["q"], float("nan"))
    paged_decode_attention(
        c["q"], c["cache"], c["tables"], c["seq_lens_t"], 0.125, out=out, num_splits=splits
    )
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.125)
    assert_close(out, ref, dtype)


def test_decode_padding_rows_give_zeros():
    # CUDA-graph padding rows have seq_len 0: they must read nothing and produce no NaN.
    c = make_case([9, 1], [1, 1], 4, 2, 64, 4, torch.bfloat16, seed=3)
    lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 4):
        out = paged_decode_attention(c["q"], c["cache"], c["tables"], lens, 0.1, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = paged_attention_ref(c["q"][:1], c["cache"], c["tables"], [0, 1], [9], 0.1)
        assert_close(out[:1], ref, torch.bfloat16)


# v2's balanced plan: a small `target` forces the batch's common chunk to be cut short, so rows
# use different numbers of splits (a long row several, a short row one: written directly and
# skipped by the merge, a padding row zeros), some grid splits stay unused.
BALANCED_CASES = [
    # seq_lens, hq, hkv, d, block_size, num_splits, target
    ([300, 3, 0, 129], 8, 2, 64, 16, 6, 8),  # chunk 128: 300 -> 3 splits, 129 -> 2, 3 -> 1, 0 pad
    ([70, 200], 16, 8, 128, 16, 2, 40),  # Qwen3-0.6B heads; the 2-split grid cap sets chunk 128
    ([65, 64, 1], 4, 4, 64, 8, 32, 1000),  # share < one tile: chunk = one tile
]


@pytest.mark.parametrize("seq_lens,hq,hkv,d,bs,splits,target", BALANCED_CASES)
def test_balanced_decode_matches_reference(seq_lens, hq, hkv, d, bs, splits, target):
    dtype = torch.bfloat16
    c = make_case([max(n, 1) for n in seq_lens], [1] * len(seq_lens), hq, hkv, d, bs, dtype, 7)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(c["q"], float("nan"))
    paged_decode_attention(
        c["q"], c["cache"], c["tables"], lens, 0.125, out=out, num_splits=splits, target=target
    )
    live = [i for i, n in enumerate(seq_lens) if n]
    qsl = list(range(len(live) + 1))
    ref = paged_attention_ref(
        c["q"][live], c["cache"], c["tables"][live], qsl, [seq_lens[i] for i in live], 0.125
    )
    assert_close(out[live], ref, dtype)
    for i, n in enumerate(seq_lens):
        if not n:
            assert torch.equal(out[i], torch.zeros_like(out[i]))


def test_v1_plan_still_selectable():
    c = make_case([130, 9], [1, 1], 8, 2, 64, 16, torch.bfloat16, seed=5)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], [130, 9], 0.125)
    for splits in (None, 3):
        out = paged_decode_attention(
            c["q"],
            c["cache"],
            c["tables"],
            c["seq_lens_t"],
            0.125,
            num_splits=splits,
            balanced=False,
        )
        assert_close(out, ref, torch.bfloat16)


def test_choose_grid_splits_caps_then_stops_splitting():
    # H200: 132 SMs x 8 = 1056 work items aimed at
    assert choose_grid_splits(1, 8, 1056) == 32
    assert choose_grid_splits(64, 8, 1056) == 5
    assert choose_grid_splits(132, 8, 1056) == 1
    assert choose_grid_splits(256, 8, 1056) == 1


def test_choose_num_splits_fills_the_gpu_then_stops_splitting():
    assert choose_num_splits(1, 8) == 16
    assert choose_num_splits(8, 8) == 9
    assert choose_num_splits(256, 8) == 1


# ---- prefill ------------------------------------------------------------------------------------
PREFILL_CASES = [
    # seq_lens, query_lens, hq, hkv, d, block_size, block_m
    ([20, 7], [20, 7], 4, 2, 64, 4, 16),  # fresh prompts, no cached prefix
    ([45, 30, 9], [13, 1, 9], 8, 2, 128, 16, 16),  # cached prefix + chunk, a decode, a prompt
    ([70], [70], 14, 2, 64, 8, 64),  # GQA 7, several query tiles and key tiles
    ([37, 80], [1, 17], 16, 8, 128, 32, 16),  # Qwen3-0.6B heads, prefix longer than the block
    ([290], [3], 4, 1, 64, 16, 16),  # MQA, a long cached prefix: the running max moves
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_lens,query_lens,hq,hkv,d,bs,block_m", PREFILL_CASES)
def test_prefill_matches_reference(seq_lens, query_lens, hq, hkv, d, bs, block_m, dtype):
    c = make_case(seq_lens, query_lens, hq, hkv, d, bs, dtype, seed=sum(seq_lens))
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    work = torch.tensor(build_prefill_work(c["qsl"], block_m), dtype=torch.int32, device=DEVICE)
    out = torch.full_like(c["q"], float("nan"))
    paged_prefill_attention(
        c["q"],
        c["cache"],
        c["tables"],
        c["qsl_t"],
        c["seq_lens_t"],
        0.09,
        work.view(-1, 2),
        block_m,
        out=out,
    )
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.09)
    assert_close(out, ref, dtype)


def test_build_prefill_work_covers_every_row_once():
    work = build_prefill_work([0, 3, 3, 40, 41], 16)
    pairs = list(zip(work[::2], work[1::2], strict=True))
    assert pairs == [(0, 0), (2, 0), (2, 16), (2, 32), (3, 0)]


# ---- the backend, against the torch reference backend -------------------------------------------
def _meta(c, decode_only: bool):
    from asyncllm.engine.layers.attention import AttentionMetadata

    qsl = c["qsl"]
    return AttentionMetadata(
        query_start_loc=c["qsl_t"],
        seq_lens=c["seq_lens_t"],
        slot_mapping=c["slots"],
        block_tables=c["tables"],
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)),
        max_seq_len=max(c["seq_lens"]),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=c["seq_lens"],
        decode_only=decode_only,
    )


@pytest.mark.parametrize(
    "seq_lens,query_lens", [([30, 12, 5], [1, 1, 1]), ([30, 12, 5], [1, 12, 3])]
)
def test_backend_matches_torch_backend(seq_lens, query_lens):
    from asyncllm.engine.layers.attention import TorchAttentionBackend
    from asyncllm.engine.layers.triton_attention import TritonAttentionBackend

    dtype = torch.float32
    c = make_case(seq_lens, query_lens, 8, 2, 64, 8, dtype, seed=11)
    decode_only = all(n == 1 for n in query_lens)
    ours_cache, ref_cache = c["cache"].clone(), c["cache"].clone()
    ours = TritonAttentionBackend().forward(
        c["q"], c["k"], c["v"], ours_cache, _meta(c, decode_only), 0.125
    )
    ref = TorchAttentionBackend().forward(
        c["q"], c["k"], c["v"], ref_cache, _meta(c, decode_only), 0.125
    )
    assert torch.equal(ours_cache, ref_cache)
    assert_close(ours, ref.float(), dtype)


# ---- larger sweeps: GPU only --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(16, 8), (32, 8), (14, 2), (12, 12)])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_gpu_sweep_decode_and_prefill(dtype, d, hq, hkv, bs):
    g = torch.Generator().manual_seed(d + hq + bs)
    n = 24
    seq_lens = torch.randint(1, 1500, (n,), generator=g).tolist()
    # a third decode, a third fresh prompts, a third chunks over a cached prefix
    query_lens = [
        1 if i % 3 == 0 else (s if i % 3 == 1 else max(1, s // 3)) for i, s in enumerate(seq_lens)
    ]
    c = make_case(seq_lens, query_lens, hq, hkv, d, bs, dtype, seed=d * bs)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, d**-0.5)
    for block_m in (16, 64):
        work = torch.tensor(build_prefill_work(c["qsl"], block_m), dtype=torch.int32)
        out = paged_prefill_attention(
            c["q"],
            c["cache"],
            c["tables"],
            c["qsl_t"],
            c["seq_lens_t"],
            d**-0.5,
            work.view(-1, 2).to(DEVICE),
            block_m,
        )
        assert_close(out, ref, dtype)
    # decode over the same contexts: each sequence's last token as its query
    last = torch.tensor([c["qsl"][i + 1] - 1 for i in range(n)], device=DEVICE)
    for splits in (None, 1, 7):
        out = paged_decode_attention(
            c["q"][last], c["cache"], c["tables"], c["seq_lens_t"], d**-0.5, num_splits=splits
        )
        assert_close(out, ref[last], dtype)


# ---- sliding window and soft cap (Mistral, Qwen2, Gemma 2/3) -------------------------------------
WINDOW_CASES = [
    # seq_lens, query_lens, window, softcap
    ([30, 9, 17], [1, 9, 5], 6, None),  # decode past the window, a prompt, a chunk over a prefix
    ([40, 3], [12, 1], 1, None),  # window 1: each token sees only itself
    ([25, 8], [25, 1], 9, 2.0),  # window and soft cap together (Gemma 2's local layers)
    ([21], [4], None, 1.5),  # soft cap alone (Gemma 2's global layers)
]


@pytest.mark.parametrize("seq_lens,query_lens,window,softcap", WINDOW_CASES)
def test_windowed_prefill_and_decode_match_reference(seq_lens, query_lens, window, softcap):
    dtype = torch.float32
    c = make_case(seq_lens, query_lens, 4, 2, 32, 4, dtype, seed=sum(seq_lens) + (window or 0))
    c["q"] = c["q"] * 3  # sharper scores: the window and the cap matter
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    ref = paged_attention_ref(
        c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.2, window, softcap
    )
    plain = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.2)
    assert not torch.allclose(ref, plain, atol=1e-3)
    work = torch.tensor(build_prefill_work(c["qsl"], 16), dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(
        c["q"],
        c["cache"],
        c["tables"],
        c["qsl_t"],
        c["seq_lens_t"],
        0.2,
        work.view(-1, 2),
        16,
        sliding_window=window,
        logits_soft_cap=softcap,
    )
    assert_close(out, ref, dtype)
    last = torch.tensor([c["qsl"][i + 1] - 1 for i in range(len(seq_lens))], device=DEVICE)
    for splits in (1, 3):
        out = paged_decode_attention(
            c["q"][last],
            c["cache"],
            c["tables"],
            c["seq_lens_t"],
            0.2,
            num_splits=splits,
            sliding_window=window,
            logits_soft_cap=softcap,
        )
        assert_close(out, ref[last], dtype)


def test_windowed_kernels_skip_blocks_before_the_window():
    """Blocks wholly before every query's window are never read (they may be freed): NaN in them
    changes nothing."""
    seq_lens, query_lens, window = [33, 26], [1, 3], 7
    c = make_case(seq_lens, query_lens, 4, 2, 32, 4, torch.float32, seed=4)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.2, window)
    for b, (n, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        first = n - ql - window + 1
        for j in range(first // 4):
            c["cache"][:, int(c["tables"][b, j])] = float("nan")
    work = torch.tensor(build_prefill_work(c["qsl"], 16), dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(
        c["q"],
        c["cache"],
        c["tables"],
        c["qsl_t"],
        c["seq_lens_t"],
        0.2,
        work.view(-1, 2),
        16,
        sliding_window=window,
    )
    assert_close(out, ref, torch.float32)
    out = paged_decode_attention(
        c["q"][:1], c["cache"], c["tables"][:1], c["seq_lens_t"][:1], 0.2, sliding_window=window
    )
    assert_close(out, ref[:1], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window,softcap", [(64, None), (17, None), (300, 50.0), (None, 30.0)])
def test_gpu_windowed_sweep(dtype, window, softcap):
    g = torch.Generator().manual_seed(window or 1)
    n = 18
    seq_lens = torch.randint(1, 900, (n,), generator=g).tolist()
    query_lens = [
        1 if i % 3 == 0 else (s if i % 3 == 1 else max(1, s // 3)) for i, s in enumerate(seq_lens)
    ]
    c = make_case(seq_lens, query_lens, 16, 4, 128, 16, dtype, seed=n)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    ref = paged_attention_ref(
        c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 128**-0.5, window, softcap
    )
    for block_m in (16, 64):
        work = torch.tensor(build_prefill_work(c["qsl"], block_m), dtype=torch.int32)
        out = paged_prefill_attention(
            c["q"],
            c["cache"],
            c["tables"],
            c["qsl_t"],
            c["seq_lens_t"],
            128**-0.5,
            work.view(-1, 2).to(DEVICE),
            block_m,
            sliding_window=window,
            logits_soft_cap=softcap,
        )
        assert_close(out, ref, dtype)
    last = torch.tensor([c["qsl"][i + 1] - 1 for i in range(n)], device=DEVICE)
    for splits in (None, 1, 7):
        out = paged_decode_attention(
            c["q"][last],
            c["cache"],
            c["tables"],
            c["seq_lens_t"],
            128**-0.5,
            num_splits=splits,
            sliding_window=window,
            logits_soft_cap=softcap,
        )
        assert_close(out, ref[last], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("target", [None, 64])
def test_gpu_balanced_decode_over_256_sequences(target):
    # v2 sums seq_lens 256 rows a load: a batch past one load (eager decode above the graphs)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 300, (300,), generator=g).tolist()
    c = make_case(seq_lens, [1] * 300, 16, 8, 128, 16, torch.bfloat16, seed=2)
    write_kv_cache(c["k"], c["v"], c["cache"], c["slots"])
    out = paged_decode_attention(
        c["q"], c["cache"], c["tables"], c["seq_lens_t"], 0.088, num_splits=4, target=target
    )
    ref = paged_attention_ref(c["q"], c["cache"], c["tables"], c["qsl"], seq_lens, 0.088)
    assert_close(out, ref, torch.bfloat16)
