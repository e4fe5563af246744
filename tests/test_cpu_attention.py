"""The CPU paged decode attention kernel (asyncllm.engine.kernels.cpu_decode_attention) against
the torch backend's gather + SDPA decode path, its build cache, its fallback, its threads."""

from __future__ import annotations

import logging
import math
import os
import threading

import pytest
import torch

from asyncllm.engine.kernels import cpu_decode_attention as cda
from asyncllm.engine.layers.attention import TorchAttentionBackend

from .test_attention import build_case, dense_reference


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library; the module state is restored afterwards."""
    monkeypatch.setenv("ASYNCLLM_KERNEL_CACHE", str(tmp_path / "kernels"))
    cda.reset()
    yield tmp_path / "kernels"
    cda.reset()


@pytest.fixture(scope="module")
def lib():
    cda.reset()
    loaded = cda.load()
    if loaded is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    return loaded


def make_decode(gen, lens, hq, hkv, d, block_size, extra_width=2):
    """Random paged inputs: block 0 reserved, every other block handed out shuffled; block
    tables padded with 0 and wider than needed; rows with seq_len 0 are padding."""
    nblk = [-(-n // block_size) for n in lens]
    num_blocks = sum(nblk) + 3
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(nblk) + extra_width
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, n in enumerate(nblk):
        tables[b, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lens), hq, d, generator=gen)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


def reference(q, cache, tables, lens, scale):
    return TorchAttentionBackend._decode_torch(q, cache, tables, lens, int(lens.max()), scale)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)])
def test_kernel_matches_torch_decode(lib, hq, hkv, d, block_size):
    gen = torch.Generator().manual_seed(hash((hq, hkv, d, block_size)) % 2**31)
    lens = torch.randint(1, 300, (13,), generator=gen).tolist()
    lens[:4] = [1, 2, block_size, block_size + 1]
    lens[5] = 0  # padding rows
    lens[-1] = 0
    q, cache, tables, seq_lens = make_decode(gen, lens, hq, hkv, d, block_size)
    scale = 1 / math.sqrt(d)
    out = cda.decode(q, cache, tables, seq_lens, scale)
    ref = reference(q, cache, tables, seq_lens, scale)
    real = seq_lens > 0
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))


@pytest.mark.parametrize("batch", [1, 3, 4, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_work_split_per_sequence_or_per_head(lib, batch, threads):
    """Enough sequences: one work item per sequence (all KV heads); few: per (sequence, head).
    Both give the reference's answers."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(batch * 10 + threads)
        lens = torch.randint(1, 200, (batch,), generator=gen).tolist()
        q, cache, tables, seq_lens = make_decode(gen, lens, 9, 3, 64, 16)
        out = cda.decode(q, cache, tables, seq_lens, 0.125)
        torch.testing.assert_close(out, reference(q, cache, tables, seq_lens, 0.125))
    finally:
        torch.set_num_threads(before)


def test_kernel_matches_float64_on_long_contexts(lib):
    gen = torch.Generator().manual_seed(11)
    lens = [700, 1, 1025, 333]
    q, cache, tables, seq_lens = make_decode(gen, lens, 12, 4, 64, 16)
    out = cda.decode(q, cache, tables, seq_lens, 0.125)
    for b, n in enumerate(lens):
        ids = tables[b, : -(-n // 16)].long()
        k = cache[0, ids].flatten(0, 1)[:n]
        v = cache[1, ids].flatten(0, 1)[:n]
        ref = dense_reference(q[b : b + 1], k, v, n - 1, 0.125)[0]
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)


def test_large_scores_do_not_overflow(lib):
    """Scores in the hundreds: the softmax subtracts the max, as SDPA does."""
    gen = torch.Generator().manual_seed(5)
    q, cache, tables, seq_lens = make_decode(gen, [50, 170, 3], 6, 2, 64, 16)
    q = q * 40
    out = cda.decode(q, cache, tables, seq_lens, 0.125)
    torch.testing.assert_close(out, reference(q, cache, tables, seq_lens, 0.125))


def test_strided_inputs(lib):
    """q as a view into a fused qkv row (the model's layout), a non-contiguous block table."""
    gen = torch.Generator().manual_seed(9)
    hq, hkv, d = 9, 3, 64
    lens = [40, 170, 97, 16, 0, 1]
    q, cache, tables, seq_lens = make_decode(gen, lens, hq, hkv, d, 16)
    qkv = torch.randn(len(lens), (hq + 2 * hkv) * d, generator=gen)
    qkv[:, : hq * d] = q.reshape(len(lens), -1)
    q_view = qkv[:, : hq * d].view(len(lens), hq, d)
    assert not q_view.is_contiguous()
    wide = torch.zeros(tables.shape[0], 2 * tables.shape[1], dtype=torch.int32)
    wide[:, ::2] = tables
    t_view = wide[:, ::2]
    out = cda.decode(q_view, cache, t_view, seq_lens, 0.125)
    ref = reference(q, cache, tables, seq_lens, 0.125)
    torch.testing.assert_close(out[seq_lens > 0], ref[seq_lens > 0], atol=1e-5, rtol=1e-5)


def test_bad_block_id_raises(lib):
    gen = torch.Generator().manual_seed(1)
    q, cache, tables, seq_lens = make_decode(gen, [20, 30], 4, 2, 64, 16)
    tables[1, 1] = cache.shape[1]
    with pytest.raises(RuntimeError, match="block id outside"):
        cda.decode(q, cache, tables, seq_lens, 0.125)


@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_backend_uses_kernel_and_agrees_with_torch_path(lib, monkeypatch, kind):
    """The backend's forward with the kernel (default on CPU float32) and with
    ASYNCLLM_CPU_ATTENTION=torch: the same outputs, both equal to the dense reference."""
    gen = torch.Generator().manual_seed(3)
    specs = [(0, 7), (5, 1), (40, 1), (0, 1), (129, 1)] if kind == "mixed" else []
    specs = specs or [(0, 1), (6, 1), (17, 1), (170, 1), (63, 1)]
    q, k, v, cache, meta, full, _ = build_case(gen, specs, 9, 3, 64, 16, 0)
    calls = []
    real_decode = cda.decode
    monkeypatch.setattr(cda, "decode", lambda *a: calls.append(1) or real_decode(*a))
    out = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, 0.125)
    assert calls, "the kernel was not used"
    monkeypatch.setenv("ASYNCLLM_CPU_ATTENTION", "torch")
    assert not cda.usable(q, cache)
    out_torch = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, 0.125)
    torch.testing.assert_close(out, out_torch, atol=1e-5, rtol=1e-5)
    for b, (cached, new) in enumerate(specs):
        a = meta.query_start_loc_cpu[b]
        ref = dense_reference(q[a : a + new], *full[b], cached, 0.125)
        torch.testing.assert_close(out[a : a + new].double(), ref, atol=1e-5, rtol=1e-5)


def test_not_used_for_bfloat16(lib):
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    assert not cda.usable(q, torch.zeros(2, 1, 16, 2, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_failed_build_falls_back_to_torch(fresh, monkeypatch, caplog, cc):
    """No compiler (or one that fails): decode() says None once, logged once, and the backend
    still gives the reference's answers."""
    monkeypatch.setenv("ASYNCLLM_CC", cc)
    gen = torch.Generator().manual_seed(4)
    specs = [(0, 1), (6, 1), (33, 1)]
    q, k, v, cache, meta, full, _ = build_case(gen, specs, 9, 3, 64, 16, 0)
    with caplog.at_level(logging.INFO, logger=cda.__name__):
        assert cda.decode(q, cache, meta.block_tables, meta.seq_lens, 0.125) is None
        for _ in range(3):
            out = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.125)
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    for b, (cached, _) in enumerate(specs):
        ref = dense_reference(q[b : b + 1], *full[b], cached, 0.125)
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=1e-5, rtol=1e-5)
    assert not fresh.exists() or not list(fresh.glob("*.so"))


def test_build_is_cached_and_safe_in_parallel(fresh, monkeypatch):
    if cda.shutil.which(cda.compiler()) is None:
        pytest.skip("no C compiler")
    paths, errors = [], []

    def build():
        try:
            paths.append(cda._build(cda.compiler(), fresh))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in fresh.iterdir()] == [paths[0].name]  # no temp files left
    # a second build finds it and compiles nothing
    monkeypatch.setattr(cda.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt"))
    assert cda._build(cda.compiler(), fresh) == paths[0]
    assert cda.load() is not None


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_one_openmp_runtime_and_no_extra_threads(lib):
    """The kernel runs on torch's OpenMP runtime: one runtime mapped, and calling it starts no
    threads beyond the pool torch's own parallel ops use."""
    with open("/proc/self/maps") as f:
        runtimes = {
            os.path.basename(line.split()[-1])
            for line in f
            if any(n in line for n in ("libgomp", "libiomp5", "libomp"))
        }
    assert len(runtimes) == 1, runtimes
    gen = torch.Generator().manual_seed(2)
    q, cache, tables, seq_lens = make_decode(gen, [100] * 32, 9, 3, 64, 16)
    a = torch.randn(256, 256)
    for _ in range(3):
        a @ a
        (a + 1).sum()
    before = _threads()
    for _ in range(5):
        cda.decode(q, cache, tables, seq_lens, 0.125)
        a @ a
    assert _threads() == before
