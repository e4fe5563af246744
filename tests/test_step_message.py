"""The step message between scheduler and runner: the runner, given only messages, builds the
inputs the live sequences describe; a known sequence carries only deltas; the message pickles."""

from __future__ import annotations

import pickle

import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.engine.step_message import StepMessage
from tests.test_scheduler import make, make_seq, run_step

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time there was a little model that could",
    "Hello world, again and again",
]


def _inputs_from_live_seqs(scheduled, block_size: int, prev_tokens) -> dict[str, list]:
    """The batch exactly as read from the live sequences (the runner's inputs before the
    message existed): tokens, positions, slots, lengths and padded block tables."""
    ids, pos, slots, lens, tables = [], [], [], [], []
    width = max(len(s.seq.block_table) for s in scheduled)
    for s in scheduled:
        seq = s.seq
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
        if end > len(seq.token_ids):
            ids.append(int(prev_tokens[seq.pending_row]))
        else:
            ids += seq.token_ids[start:end]
        pos += range(start, end)
        t = seq.block_table
        slots += [t[p // block_size] * block_size + p % block_size for p in range(start, end)]
        lens.append(end)
        tables.append(t + [0] * (width - len(t)))
    return {"ids": ids, "pos": pos, "slots": slots, "lens": lens, "tables": tables}


CONFIGS = {
    # a fixed cache: on CUDA a profiled one takes 90% of the GPU from the next test's engine
    "chunked_async": {"max_num_batched_tokens": 6, "async_scheduling": True, "num_kv_blocks": 512},
    "preempting_sync": {"num_kv_blocks": 18, "block_size": 4, "async_scheduling": False},
    "preempting_async": {"num_kv_blocks": 18, "block_size": 4, "async_scheduling": True},
}


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "lists"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_runner_state_built_from_messages_gives_the_live_sequences_inputs(
    tiny_model_dir, config, persistent
):
    llm = LLM(tiny_model_dir, **CONFIGS[config])
    engine = llm.llm_engine
    runner, scheduler = engine.runner, engine.scheduler
    runner.persistent = persistent
    last: list = []
    checked = {"steps": 0, "cached": 0, "pending": 0, "copies": 0}
    real_schedule, real_prepare = scheduler.schedule, runner.prepare

    def schedule():
        out = real_schedule()
        last[:] = [out]
        return out

    def prepare(step: StepMessage, prev_tokens=None):
        ids, pos, meta = real_prepare(step, prev_tokens)
        sched = last[0]
        assert step is sched.step
        want = _inputs_from_live_seqs(sched.scheduled, runner.block_size, prev_tokens)
        assert ids.tolist() == want["ids"] and pos.tolist() == want["pos"]
        assert meta.slot_mapping.tolist() == want["slots"]
        assert meta.seq_lens.tolist() == want["lens"]
        assert meta.block_tables.tolist() == want["tables"]
        # The persistent batch's tensors and the list-built ones agree field by field.
        ids2, pos2, meta2 = runner._prepare_lists(step, prev_tokens)
        assert ids2.tolist() == ids.tolist() and pos2.tolist() == pos.tolist()
        for f in ("query_start_loc", "seq_lens", "slot_mapping", "block_tables"):
            a, b = getattr(meta, f), getattr(meta2, f)
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), f
        for f in ("max_query_len", "max_seq_len", "query_start_loc_cpu", "seq_lens_cpu"):
            assert getattr(meta, f) == getattr(meta2, f), f
        assert meta.decode_only == meta2.decode_only
        # A sequence the runner holds arrives as deltas only: at most the tokens the host
        # learned since its last step (two with async scheduling: it resolves one step late).
        assert all(len(t) <= 2 for t in step.cached.new_token_ids)
        # Finished and preempted sequences were dropped; new ones arrived whole.
        assert set(step.seq_ids) <= set(runner.states)
        assert set(runner.states) <= {q.seq_id for q in scheduler.running}
        checked["steps"] += 1
        checked["cached"] += len(step.cached)
        checked["pending"] += sum(r >= 0 for r in step.pending_rows)
        checked["copies"] += len(step.block_copies)
        pickle.loads(pickle.dumps(step))
        return ids, pos, meta

    scheduler.schedule, runner.prepare = schedule, prepare
    params = [
        # n=3 on a 5-token prompt: the children share a part-filled block (copy-on-write).
        SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
    ]
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    # Again: now prompts hit the prefix cache and arrive with their cached blocks computed.
    again = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[-1].token_ids for o in again] == [o.outputs[-1].token_ids for o in first]
    assert engine.get_stats().prefix_cache_hit_tokens > 0
    assert checked["steps"] > 10 and checked["cached"] > 0 and checked["copies"] > 0
    assert (checked["pending"] > 0) == CONFIGS[config]["async_scheduling"]
    if config.startswith("preempting"):
        assert engine.get_stats().num_preemptions > 0
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_a_known_sequence_carries_only_what_changed():
    s = make(block_size=4, budget=64)
    a, b = make_seq(6, rid="a"), make_seq(3, t=1, rid="b")
    s.add(a)
    s.add(b)
    first = run_step(s).step  # both prefill, then each samples token 1
    assert [n.seq_id for n in first.new_seqs] == [a.seq_id, b.seq_id]
    assert first.new_seqs[0].token_ids == a.token_ids[:6] and len(first.cached) == 0
    assert first.samples == [True, True] and first.pending_rows == [-1, -1]
    second = run_step(s).step
    assert second.new_seqs == [] and second.cached.seq_ids == [a.seq_id, b.seq_id]
    assert second.cached.new_token_ids == [[1], [1]]
    assert second.cached.num_computed_tokens == [6, 3]
    # a's 7th token fits its second block; b's 4th token fits its first: no new blocks.
    assert second.cached.new_block_ids == [[], []]
    assert second.cached.block_ids_from == [2, 1]
    third = run_step(s).step  # b's 5th token needs a second block
    assert third.cached.new_block_ids == [[], [b.block_table[1]]]
    assert third.cached.block_ids_from == [2, 1]
    fourth = run_step(s).step  # a's 9th token needs a third block
    assert fourth.cached.new_block_ids == [[a.block_table[2]], []]
    assert fourth.cached.block_ids_from == [2, 2]
    assert fourth.num_new_tokens == [1, 1] and fourth.num_batched_tokens == 2


def test_finished_and_preempted_sequences_are_dropped_and_a_resumed_one_comes_back_whole():
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = make_seq(7, t=0, rid="a"), make_seq(7, t=1, rid="b")
    s.add(a)
    s.add(b)
    run_step(s)
    run_step(s)
    out = run_step(s)  # a needs a third block: b is preempted
    assert out.preempted == [b] and out.step.dropped_seq_ids == [b.seq_id]
    assert out.step.seq_ids == [a.seq_id]
    s.finish(a)
    out = run_step(s)  # b resumes from scratch with its generated tokens
    assert out.step.dropped_seq_ids == [a.seq_id]
    assert [n.seq_id for n in out.step.new_seqs] == [b.seq_id]
    new = out.step.new_seqs[0]
    assert new.num_computed_tokens == 0 and len(new.token_ids) == 9 and new.num_prompt_tokens == 7
    assert run_step(s).step.dropped_seq_ids == []


def test_copy_on_write_replaces_the_block_in_the_runners_table():
    s = make(block_size=4, budget=64)
    parent = make_seq(6, rid="p")
    s.add(parent)
    run_step(s)  # 7 tokens, 6 computed, 2 blocks
    child = make_seq(6, rid="p")
    child.token_ids = list(parent.token_ids)
    child.num_computed_tokens = parent.num_computed_tokens
    s.block_manager.fork(parent, child)
    s.add_running(child)
    shared = parent.block_table[1]
    out = run_step(s)
    assert out.block_copies == [(shared, parent.block_table[1])]
    assert out.step.block_copies == out.block_copies
    # The parent wrote first into the shared block: its second entry is replaced.
    assert out.step.cached.seq_ids == [parent.seq_id]
    assert out.step.cached.block_ids_from == [1]
    assert out.step.cached.new_block_ids == [[parent.block_table[1]]]
    assert [n.block_ids for n in out.step.new_seqs] == [[parent.block_table[0], shared]]


def test_a_decode_message_pickles_small():
    s = make(num_blocks=1024, block_size=16, budget=16384, max_seqs=256)
    for i in range(256):
        s.add(make_seq(40, t=i, rid=f"r{i}"))
    run_step(s)
    msg = run_step(s).step
    assert len(msg.cached) == 256 and not msg.new_seqs
    back = pickle.loads(pickle.dumps(msg))
    assert back == msg and isinstance(back, StepMessage)
    # Deltas only: a few ints per sequence, not its 40 tokens or its block table.
    assert len(pickle.dumps(msg)) < 64 * 256
    assert all(len(t) == 1 for t in msg.cached.new_token_ids)
    assert all(isinstance(v, list) for v in vars(msg.cached).values())
    assert not any(isinstance(v, torch.Tensor) for v in vars(msg).values())


def test_the_persistent_table_grows_and_keeps_rows_past_their_length_zero():
    from asyncllm.engine.input_batch import PersistentBatch

    batch = PersistentBatch(4, torch.device("cpu"), rows=1, width=1)
    a = batch.acquire([5, 6, 7])  # wider than the table
    b = batch.acquire([9])  # more rows than it had
    assert a != b and batch.tables[a, :3].tolist() == [5, 6, 7]
    assert batch.tables[b].tolist()[:3] == [9, 0, 0]
    batch.write(a, 1, [8], 3)  # copy-on-write from entry 1, the table shorter after it
    assert batch.tables[a, :3].tolist() == [5, 8, 0]
    batch.release(a, 2)
    c = batch.acquire([1])
    assert c == a and batch.tables[c, :3].tolist() == [1, 0, 0]
