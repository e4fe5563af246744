"""Async scheduling (one step in flight, the next launched before its tokens reach the host) must
change nothing a user can see: the same tokens, text, logprobs and finish reasons as the
synchronous engine, for every sampling feature, through chunked prefill, preemption, n > 1,
aborts and stop strings; and every KV block free afterwards.

On the CPU nothing actually overlaps, but the bookkeeping (pending tokens, tokens fed from the
device tensor of the step in flight, void rows of sequences that finished, deferred sampling for
penalties) is exactly the GPU's, so it is tested here."""

from __future__ import annotations

import pytest

from asyncllm import LLM, SamplingParams
from asyncllm.sampling_params import RequestOutputKind
from tests.test_llm import PROMPTS as LLM_PROMPTS
from tests.tiny_models import hf_greedy

PROMPTS = [*LLM_PROMPTS, "Emoji: 😀 🚀"]


def _params() -> list[SamplingParams]:
    """One of each sampling feature, so a batch mixes deferred and immediate sampling."""
    return [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=8, seed=4, max_tokens=16, logprobs=3),
        SamplingParams(
            temperature=0,
            max_tokens=15,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.2,
            ignore_eos=True,
        ),
        SamplingParams(temperature=1.0, seed=5, min_tokens=6, max_tokens=10),
        SamplingParams(n=3, temperature=1.0, seed=6, max_tokens=9, ignore_eos=True),
    ]


def _summary(outs) -> list:
    res = []
    for o in outs:
        for c in o.outputs:
            lps = None
            if c.logprobs is not None:
                lps = [{k: v.logprob for k, v in d.items()} for d in c.logprobs]
            res.append((o.request_id[-1], c.index, c.token_ids, c.text, c.finish_reason, lps))
    return res


CONFIGS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 6},
    "preempting": {"num_kv_blocks": 18, "block_size": 4},
    "small_batch": {"max_num_seqs": 3},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir, config):
    outs = {}
    for mode in (False, True):
        llm = LLM(tiny_model_dir, async_scheduling=mode, **CONFIGS[config])
        assert llm.llm_engine.async_scheduling is mode
        res = llm.generate(PROMPTS, _params(), use_tqdm=False)
        outs[mode] = _summary(res)
        stats = llm.llm_engine.get_stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
        assert stats.num_running == stats.num_waiting == 0
        if config == "preempting":
            assert stats.num_preemptions > 0
    _assert_same(outs[True], outs[False])


def _assert_same(got: list, want: list) -> None:
    """Equal tokens, text and finish reasons; logprobs equal to float noise (the batches of the
    two engines can differ in shape, since async admits waiting prompts one step later)."""
    assert [r[:5] for r in got] == [r[:5] for r in want]
    for g, w in zip(got, want, strict=True):
        if w[5] is None:
            assert g[5] is None
            continue
        for dg, dw in zip(g[5], w[5], strict=True):
            assert dg.keys() == dw.keys()
            assert all(abs(dg[k] - dw[k]) < 1e-4 for k in dw)


def test_async_greedy_equals_transformers(tiny_model_dirs):
    # mistral: every layer windowed, so blocks are released while a step is in flight
    for arch in ("llama", "qwen3", "mistral"):
        path = tiny_model_dirs[arch]
        llm = LLM(path, async_scheduling=True, num_kv_blocks=12, block_size=4)
        tok = llm.get_tokenizer()
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        outs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
        for p, o in zip(PROMPTS[:4], outs, strict=True):
            assert o.outputs[0].token_ids == hf_greedy(path, tok.encode(p), 10)


def test_one_step_stays_in_flight_and_outputs_come_one_step_late(tiny_model_dir):
    llm = LLM(tiny_model_dir, async_scheduling=True)
    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    engine.add_request("a", "Hello world", params)
    assert engine.step() == []  # the prefill is launched, its token not yet resolved
    seq = engine.requests["a"].seqs[0]
    assert seq.num_pending == 1 and seq.num_output_tokens == 0
    got: list[int] = []
    steps = 1
    while engine.has_unfinished_requests():
        for out in engine.step():
            got += out.outputs[0].token_ids
        steps += 1
    assert len(got) == 5
    # 5 tokens: 5 launches, the last resolved by one more call; the token after the last is never
    # computed (its sequence ends by length, so it is not scheduled again).
    assert steps == 6 and engine.num_steps == 5
    assert engine.get_stats().kv_blocks_free == engine.get_stats().kv_blocks_total


def test_eos_finish_voids_the_in_flight_token(tiny_model_dir):
    """A sequence that stops on a stop token while its next step is in flight: that step's token
    is dropped, and the output ends exactly where the synchronous engine's does."""
    sync = LLM(tiny_model_dir, async_scheduling=False)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = sync.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_tok = ids[4]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok])
    want = sync.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    llm = LLM(tiny_model_dir, async_scheduling=True)
    got = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids == ids[: ids.index(stop_tok) + 1]
    assert got.finish_reason == "stop" and got.stop_reason == stop_tok
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_stop_strings_and_deltas_under_async_scheduling(tiny_model_dir):
    sync = LLM(tiny_model_dir, async_scheduling=False)
    text = (
        sync.generate(
            PROMPTS[2],
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    stop = text[6:9]
    params = SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True)
    want = sync.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    engine = LLM(tiny_model_dir, async_scheduling=True).llm_engine
    delta = params.clone()
    delta.output_kind = RequestOutputKind.DELTA
    engine.add_request("s", PROMPTS[2], delta)
    pieces, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].text)
            last = out
    assert "".join(pieces) == want.text
    assert last is not None and last.finished and last.outputs[0].finish_reason == "stop"


def test_abort_with_a_step_in_flight_frees_everything(tiny_model_dir):
    llm = LLM(tiny_model_dir, async_scheduling=True, max_num_seqs=4)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params)
    for _ in range(4):
        engine.step()
    outs = engine.abort_request(["r0", "r2", "r5"])
    assert {o.request_id for o in outs} == {"r0", "r2", "r5"}
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"r1", "r3", "r4"}
    assert all(len(o.outputs[0].token_ids) == 30 for o in finished.values())
    # Everything aborted in flight left nothing behind, even before another request comes.
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0
    # The engine is reusable afterwards, and the void in-flight rows did not disturb it.
    again = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    ref = LLM(tiny_model_dir, async_scheduling=False).generate(PROMPTS[0], params, use_tqdm=False)
    assert again == ref[0].outputs[0].token_ids


def test_prompt_logprobs_and_prefix_cache_under_async_scheduling(tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, logprobs=1)
    res = {}
    for mode in (False, True):
        llm = LLM(tiny_model_dir, async_scheduling=mode, block_size=4)
        a = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
        b = llm.generate(PROMPTS[2] + " again", params, use_tqdm=False)[0]  # a cached prefix
        res[mode] = [
            (
                o.outputs[0].token_ids,
                [None if d is None else sorted(d) for d in o.prompt_logprobs],
                o.num_cached_tokens,
            )
            for o in (a, b)
        ]
    assert res[True] == res[False]


def test_async_scheduling_flag_and_default(tiny_model_dir):
    # On the CPU nothing runs asynchronously, so the default is the synchronous engine.
    assert LLM(tiny_model_dir).llm_engine.async_scheduling is False
    from asyncllm.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["serve", tiny_model_dir, "--async-scheduling"])
    assert engine_args_from(ns).async_scheduling is True


def test_max_model_len_ends_in_flight_sequences_at_the_same_token(tiny_model_dir):
    """A sequence whose pending token reaches max_model_len is not scheduled again (its next
    token could not be stored), and it ends with exactly the synchronous engine's tokens."""
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (10, 3, 15)]
    res = {}
    for mode in (False, True):
        llm = LLM(tiny_model_dir, max_model_len=16, block_size=4, async_scheduling=mode)
        outs = llm.generate(prompts, params, use_tqdm=False)
        res[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
        stats = llm.llm_engine.get_stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
    assert res[True] == res[False]
    assert [len(ids) for ids, _ in res[True]] == [6, 13, 1]
    assert all(reason == "length" for _, reason in res[True])
