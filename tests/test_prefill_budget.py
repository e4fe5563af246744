"""Head-of-line blocking: a per-step prefill budget (SchedulerConfig.max_prefill_tokens) keeps
running decodes flowing while a long prompt is prefilled in chunks."""

from __future__ import annotations

import pytest

from asyncllm.config import EngineArgs, SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.scheduler import Scheduler, prefill_chunk, prefill_cost
from tests.test_scheduler import make_seq, run_step


def make(budget: int, prefill: int | None) -> Scheduler:
    bm = BlockManager(128, 4, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(8, budget, 1024, max_prefill_tokens=prefill), bm)


def _ids(out):
    return [(x.seq.request.request_id, x.num_new_tokens) for x in out.scheduled]


def test_prompt_chunks_are_capped_and_decodes_run_every_step():
    s = make(budget=64, prefill=8)
    a = make_seq(6, t=0, rid="a")
    s.add(a)
    assert _ids(run_step(s)) == [("a", 6)]  # a prompt under the cap: whole
    long = make_seq(30, t=1, rid="long")
    s.add(long)
    steps = [_ids(run_step(s)) for _ in range(4)]
    # waiting chunk, then the running (partly prefilled) prompt's chunks: 8 each, a decodes
    assert steps == [[("a", 1), ("long", 8)]] * 3 + [[("a", 1), ("long", 6)]]
    assert long.num_computed_tokens == 30 and long.num_output_tokens == 1


def test_the_cap_is_shared_by_all_prompts_of_a_step():
    s = make(budget=64, prefill=10)
    s.add(make_seq(3, t=0, rid="d"))
    run_step(s)  # d decodes from now on
    for k, n in enumerate((7, 7, 7)):
        s.add(make_seq(n, t=k + 1, rid=f"p{k}"))
    assert _ids(run_step(s)) == [("d", 1), ("p0", 7), ("p1", 3)]
    assert _ids(run_step(s)) == [("d", 1), ("p0", 1), ("p1", 4), ("p2", 6)]


def test_without_running_decodes_prompts_get_the_whole_budget():
    """The cap protects decodes; a batch of prompts arriving together is not slowed by it."""
    s = make(budget=64, prefill=10)
    for k in range(3):
        s.add(make_seq(20, t=k, rid=f"p{k}"))
    assert _ids(run_step(s)) == [("p0", 20), ("p1", 20), ("p2", 20)]


def test_no_cap_is_the_old_schedule():
    s = make(budget=64, prefill=None)
    s.add(make_seq(6, t=0, rid="a"))
    run_step(s)
    s.add(make_seq(30, t=1, rid="long"))
    assert _ids(run_step(s)) == [("a", 1), ("long", 30)]


def test_engine_args_validate_the_cap():
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        EngineArgs(max_prefill_tokens=0)


def test_engine_canary_gets_a_token_every_step_beside_a_long_prompt(tiny_model_dir):
    """On the CPU by default: every engine step while a long prompt prefills also advances
    the running stream by one token, and the outputs are those of an unchunked run."""
    from asyncllm import LLM, SamplingParams

    kw = dict(model=tiny_model_dir, num_kv_blocks=128, block_size=16, max_model_len=512)
    long_prompt = list(range(3, 303)) + list(range(3, 103))  # 400 tokens, chunks of <= 64
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(**kw)
    eng = llm.llm_engine
    assert eng.scheduler.config.max_prefill_tokens == 64  # the CPU default
    eng.add_request("canary", {"prompt_token_ids": [5, 6, 7, 8]}, sp)
    while not eng.step():
        pass
    eng.add_request("long", {"prompt_token_ids": long_prompt}, sp)
    canary_tokens = []
    got_long = False
    steps = 0
    while not got_long:
        outs = eng.step()
        steps += 1
        by_id = {o.request_id: o for o in outs}
        assert "canary" in by_id, f"step {steps}: the canary got nothing"
        canary_tokens.append(len(by_id["canary"].outputs[0].token_ids))
        got_long = "long" in by_id and len(by_id["long"].outputs[0].token_ids) > 0
    # The chunks the context-priced budget allows (the flat cap would take ceil(400 / 64) = 7)
    scale = eng.scheduler.config.prefill_context_scale
    assert scale is not None  # the CPU default prices the context
    expected, ctx = 0, 0
    while ctx < 400:
        ctx += max(1, prefill_chunk(400 - ctx, ctx, 64, scale))
        expected += 1
    assert steps == expected > 7
    while eng.has_unfinished_requests():
        eng.step()
    # the same tokens as without the cap
    ref = LLM(**kw, max_prefill_tokens=4096).generate(
        [{"prompt_token_ids": long_prompt}], sp, use_tqdm=False
    )
    mine = llm.generate([{"prompt_token_ids": long_prompt}], sp, use_tqdm=False)
    assert mine[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


def make_priced(budget: int, prefill: int, scale: int | None) -> Scheduler:
    bm = BlockManager(1024, 4, enable_prefix_caching=False)
    cfg = SchedulerConfig(8, budget, 4096, max_prefill_tokens=prefill, prefill_context_scale=scale)
    return Scheduler(cfg, bm)


def test_prefill_cost_charges_each_token_for_its_context():
    assert prefill_cost(64, 0, None) == 64
    assert prefill_cost(64, 5000, None) == 64
    # tokens at positions 0..3 with scale 4: 1 + p/4 each
    assert prefill_cost(4, 0, 4) == pytest.approx(1 + 1.25 + 1.5 + 1.75)
    # at positions 8, 9: 3 + 3.25, and the prefix read once: 10 * 8 / 4
    assert prefill_cost(2, 8, 4) == pytest.approx(3 + 3.25 + 20)
    assert prefill_cost(0, 8, 4) == 0


@pytest.mark.parametrize("context", [0, 1, 100, 1000, 4000, 8000])
@pytest.mark.parametrize("budget", [0.5, 1, 7, 64, 100.25])
def test_prefill_chunk_is_the_largest_that_fits(context, budget):
    n = prefill_chunk(10_000, context, budget, 1000)
    assert prefill_cost(n, context, 1000) <= budget
    assert prefill_cost(n + 1, context, 1000) > budget
    assert prefill_chunk(3, context, budget, 1000) == min(n, 3)  # the limit binds too


def test_chunks_shrink_as_the_prefix_grows_and_decodes_run_every_step():
    """A long prompt beside a decode: with context pricing each step's chunk costs at most the
    cap, so the chunks get smaller deeper into the prompt (here scale 64: a token at context
    64 costs 2) and the decode still runs every step."""
    s = make_priced(budget=512, prefill=64, scale=64)
    a = make_seq(6, t=0, rid="a")
    s.add(a)
    run_step(s)
    long = make_seq(2000, t=1, rid="long")
    s.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        ctx = long.num_computed_tokens
        out = run_step(s)
        ids = _ids(out)
        assert ids[0] == ("a", 1)  # the decode, every step
        ((name, n),) = ids[1:]
        assert name == "long"
        assert prefill_cost(n, ctx, 64) <= 64 or n == 1
        chunks.append(n)
    # by hand: 47 + 47 * 46 / 128 = 63.9 <= 64 (48: 65.6); at 47: 29 * (1 + 122 / 128) plus
    # 470 / 64 for the prefix = 64.0 (30: 66.2)
    assert chunks[:2] == [47, 29]
    assert chunks == sorted(chunks, reverse=True)  # never growing with the context
    # from 64 * 64 / 10 tokens of context the prefix alone is over the budget: one per step
    assert chunks[-1] == 1 and len(chunks) > 1500
    assert sum(chunks) == 2000


def test_a_token_deeper_than_the_budget_still_goes_one_per_step():
    """However deep the context, the step's first prompt chunk gets one token: prompts
    progress; a second prompt waits for the next step."""
    s = make_priced(budget=512, prefill=3, scale=1)
    s.add(make_seq(3, t=0, rid="d"))
    run_step(s)
    long = make_seq(40, t=1, rid="long")
    s.add(long)
    s.add(make_seq(5, t=2, rid="other"))
    assert _ids(run_step(s)) == [("d", 1), ("long", 2)]  # 1 + 2 = 3; a third costs 3 more
    for _ in range(3):  # at context 2, 3, 4 the prefix alone costs 20, 30, 40
        assert _ids(run_step(s)) == [("d", 1), ("long", 1)]


def test_without_running_decodes_context_is_not_charged():
    s = make_priced(budget=64, prefill=8, scale=1)
    s.add(make_seq(100, t=0, rid="p"))
    assert _ids(run_step(s)) == [("p", 64)]
    assert _ids(run_step(s)) == [("p", 36)]


def test_no_scale_is_the_flat_token_cap():
    s = make_priced(budget=512, prefill=16, scale=None)
    s.add(make_seq(3, t=0, rid="d"))
    run_step(s)
    s.add(make_seq(100, t=1, rid="long"))
    assert [_ids(run_step(s)) for _ in range(3)] == [[("d", 1), ("long", 16)]] * 3
