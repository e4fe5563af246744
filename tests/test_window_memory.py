"""Sliding windows bound the KV cache: blocks wholly behind every layer's window go back to the
pool (block_manager.release_outside_window), the scheduler counts on it, prefix caching still
hits, and the tokens still equal transformers'."""

from __future__ import annotations

import pytest

from asyncllm import LLM, SamplingParams
from asyncllm.engine.block_manager import NULL_BLOCK, BlockManager
from asyncllm.engine.loader import load_hf_config, resolve_model
from asyncllm.engine.models import kv_cache_window, sliding_windows
from tests.test_block_manager import compute, make_seq, match
from tests.tiny_models import WINDOW, hf_greedy


def test_which_models_release_blocks(tiny_model_dirs):
    def cfg(arch):
        return load_hf_config(resolve_model(tiny_model_dirs[arch]))

    assert sliding_windows(cfg("mistral")) == [WINDOW, WINDOW]
    assert kv_cache_window(cfg("mistral")) == WINDOW
    # one full-attention layer anywhere keeps every block
    assert sliding_windows(cfg("qwen2_window")) == [None, WINDOW]
    assert sliding_windows(cfg("gemma2")) == [WINDOW, None]
    for arch in ("qwen2_window", "gemma2", "gemma3", "llama", "qwen2"):
        assert kv_cache_window(cfg(arch)) is None


def test_release_outside_window_unit():
    bm = BlockManager(num_blocks=16, block_size=4, sliding_window=5)
    seq = make_seq(list(range(40)))
    compute(bm, seq, 40)
    assert bm.num_free_blocks == 6
    # the next token (position 40) sees 36..40: blocks 0..8 (positions 0..35) are behind it
    assert bm.release_outside_window(seq) == 9
    assert seq.block_table[:9] == [NULL_BLOCK] * 9 and NULL_BLOCK not in seq.block_table[9:]
    assert bm.num_free_blocks == 15
    assert bm.release_outside_window(seq) == 0  # idempotent
    # released full blocks stay cached: the same prefix matches them again
    other = make_seq(list(range(40)))
    assert match(bm, other) == 36
    child = make_seq(list(range(40)))
    bm.fork(seq, child)
    bm.free(seq)
    bm.free(child)
    bm.free(other)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)
    # no window: nothing is released
    plain = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq(list(range(40)))
    compute(plain, seq, 40)
    assert plain.release_outside_window(seq) == 0
    assert plain.max_blocks_held(200, 16) == 50
    assert bm.max_blocks_held(200, 16) == 6  # (5 - 1 + 16) / 4 + 1


PROMPT = [(11 * j) % 300 + 3 for j in range(20)]
NEW = 100


@pytest.fixture(scope="module")
def long_reference(tiny_model_dirs) -> list[int]:
    return hf_greedy(tiny_model_dirs["mistral"], PROMPT, NEW)


@pytest.mark.parametrize("caching", [True, False])
def test_long_windowed_generation_holds_bounded_kv(tiny_model_dirs, long_reference, caching):
    """120 tokens of Mistral (window 5) through 8 blocks of 4 tokens: without releasing, it would
    need 30 blocks; the engine never holds more than the window and a chunk, and the tokens equal
    transformers' greedy ones (whose cache keeps everything)."""
    path = tiny_model_dirs["mistral"]
    prompt, new = PROMPT, NEW
    llm = LLM(
        path,
        block_size=4,
        num_kv_blocks=8,
        max_num_batched_tokens=16,
        enable_prefix_caching=caching,
    )
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": prompt}, params)
    most = 0
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        most = max(most, engine.get_stats().kv_blocks_used)
    assert final is not None
    assert most <= engine.block_manager.max_blocks_held(len(prompt) + new, 16) == 6
    assert engine.get_stats().num_preemptions == 0
    assert final.outputs[0].token_ids == long_reference
    assert engine.get_stats().kv_blocks_free == 8


def test_prefix_cache_hits_on_a_windowed_model(tiny_model_dirs):
    path = tiny_model_dirs["mistral"]
    shared = [(7 * j) % 300 + 3 for j in range(30)]
    prompts = [{"prompt_token_ids": shared + tail} for tail in ([5, 6], [9, 10, 11])]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(path, block_size=4, num_kv_blocks=12)
    first = llm.generate(prompts[0], params, use_tqdm=False)[0]
    second = llm.generate(prompts[1], params, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    fresh = LLM(path, block_size=4, enable_prefix_caching=False)
    for out, p in ((first, prompts[0]), (second, prompts[1])):
        (want,) = fresh.generate(p, params, use_tqdm=False)
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
