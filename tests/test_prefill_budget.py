"""Head-of-line blocking: a per-step prefill budget (SchedulerConfig.max_prefill_tokens) keeps
running decodes flowing while a long prompt is prefilled in chunks."""

from __future__ import annotations

import pytest

from asyncllm.config import EngineArgs, SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.scheduler import Scheduler
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
    long_prompt = list(range(3, 303)) + list(range(3, 103))  # 400 tokens: 7 chunks (64 max)
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
    assert steps == 7  # ceil(400 / 64)
    while eng.has_unfinished_requests():
        eng.step()
    # the same tokens as without the cap
    ref = LLM(**kw, max_prefill_tokens=4096).generate(
        [{"prompt_token_ids": long_prompt}], sp, use_tqdm=False
    )
    mine = llm.generate([{"prompt_token_ids": long_prompt}], sp, use_tqdm=False)
    assert mine[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
