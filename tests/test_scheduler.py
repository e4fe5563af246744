from __future__ import annotations

from asyncllm.config import SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.scheduler import Scheduler
from asyncllm.engine.sequence import Request, Sequence
from asyncllm.sampling_params import SamplingParams


def make_seq(n_tokens: int, priority: int = 0, t: float = 0.0, rid: str = "r") -> Sequence:
    toks = [(7 * i + len(rid)) % 50 for i in range(n_tokens)]
    req = Request(rid, None, toks, SamplingParams(), arrival_time=t, priority=priority)
    seq = Sequence(request=req, index=0, token_ids=list(toks), num_prompt_tokens=n_tokens)
    req.seqs.append(seq)
    return seq


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=False) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, 1024), bm)


def run_step(s: Scheduler, sample: bool = True):
    """Apply a schedule as the engine would: computed tokens advance; completed sequences sample."""
    out = s.schedule()
    for item in out.scheduled:
        completes = item.completes
        item.seq.num_computed_tokens += item.num_new_tokens
        if sample and completes:
            item.seq.token_ids.append(1)
    return out


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    s = make(budget=16)
    seq = make_seq(40)
    s.add(seq)
    sizes = [run_step(s).num_batched_tokens for _ in range(3)]
    assert sizes == [16, 16, 8]
    assert seq.num_computed_tokens == 40 and seq.num_output_tokens == 1
    out = run_step(s)  # now a decode
    assert [x.num_new_tokens for x in out.scheduled] == [1]


def test_running_decodes_go_before_waiting_prefills_and_share_the_budget():
    s = make(budget=10)
    a = make_seq(6, t=0, rid="a")
    s.add(a)
    run_step(s)
    b = make_seq(30, t=1, rid="b")
    s.add(b)
    out = run_step(s)
    assert [(x.seq.request.request_id, x.num_new_tokens) for x in out.scheduled] == [
        ("a", 1),
        ("b", 9),
    ]


def test_max_num_seqs_is_respected():
    s = make(max_seqs=2)
    for i in range(4):
        s.add(make_seq(3, t=i, rid=f"r{i}"))
    out = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_priority_orders_waiting_then_arrival():
    s = make(max_seqs=1)
    s.add(make_seq(3, priority=5, t=0, rid="late-low"))
    s.add(make_seq(3, priority=1, t=2, rid="high-2"))
    s.add(make_seq(3, priority=1, t=1, rid="high-1"))
    out = run_step(s)
    assert out.scheduled[0].seq.request.request_id == "high-1"


def test_preemption_takes_the_lowest_priority_latest_and_frees_its_blocks():
    # 4 blocks of 4 tokens; two sequences of 7 tokens each need 2 blocks, then grow.
    s = make(num_blocks=4, block_size=4, budget=64)
    a = make_seq(7, priority=0, t=0, rid="a")
    b = make_seq(7, priority=0, t=1, rid="b")
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 8 tokens each, 7 computed, in 2 blocks -> cache full
    assert s.block_manager.num_free_blocks == 0
    run_step(s)  # the 8th token still fits in the second block
    out = run_step(s)  # a needs a third block: b (latest) is preempted
    assert out.preempted == [b]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b in s.waiting
    assert [x.seq for x in out.scheduled] == [a]
    assert b.num_output_tokens == 2  # generated tokens are kept for the recompute


def test_preempted_sequence_resumes_and_all_blocks_return():
    s = make(num_blocks=6, block_size=2, budget=64)
    seqs = [make_seq(3, t=i, rid=f"s{i}") for i in range(3)]
    for q in seqs:
        s.add(q)
    preemptions = 0
    for _ in range(200):
        out = run_step(s)
        preemptions += len(out.preempted)
        for q in list(s.running):
            if q.num_output_tokens >= 4 and q.num_uncomputed_tokens == 1:
                s.finish(q)
        if not s.has_unfinished():
            break
    assert not s.has_unfinished()
    assert preemptions > 0
    assert all(q.num_output_tokens >= 4 for q in seqs)
    assert s.block_manager.num_free_blocks == 6


def test_prefix_cache_hit_skips_computed_tokens():
    s = make(budget=64, caching=True)
    a = make_seq(17, rid="x")
    s.add(a)
    run_step(s)
    s.block_manager.register_computed(a)
    s.finish(a)
    b = make_seq(17, rid="x")  # same tokens
    s.add(b)
    out = run_step(s)
    assert out.scheduled[0].num_new_tokens == 1  # 16 of 17 tokens came from the cache


def test_a_waiting_sequence_that_cannot_run_releases_its_prefix_matched_blocks():
    # Regression: each waiting sequence that matched cached blocks but could not be allocated
    # kept them, until waiting sequences held the whole cache and nothing could ever run.
    s = make(num_blocks=6, block_size=4, budget=64, caching=True)
    first = make_seq(12, t=0, rid="a")
    s.add(first)
    run_step(s)  # computes a's 3 full blocks
    s.block_manager.register_computed(first)
    s.finish(first)
    assert s.block_manager.num_free_blocks == 6 and s.block_manager.num_cached_blocks == 3
    blocker = make_seq(13, t=1, rid="zz")  # other tokens: 4 blocks, evicting one of a's
    s.add(blocker)
    run_step(s)
    again = make_seq(21, t=2, rid="a")  # a's 2 still-cached blocks + 4 more: only 2 are free
    s.add(again)
    out = s.schedule()
    assert [x.seq.request.request_id for x in out.scheduled] == ["zz"]
    assert again.block_table == [] and again.num_computed_tokens == 0
    s.finish(blocker)
    out = s.schedule()  # now it fits, and still reuses the cached prefix
    assert [x.seq.request.request_id for x in out.scheduled] == ["a"]
    assert out.scheduled[0].num_new_tokens == 21 - 8
    assert s.block_manager.prefix_hit_tokens == 8  # the undone match is not counted twice
