from __future__ import annotations

import pytest

from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.sequence import Request, Sequence
from asyncllm.sampling_params import SamplingParams


def make_seq(tokens: list[int], priority: int = 0, t: float = 0.0) -> Sequence:
    req = Request("r", None, list(tokens), SamplingParams(), arrival_time=t, priority=priority)
    seq = Sequence(request=req, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens))
    req.seqs.append(seq)
    return seq


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.register_computed(seq)


def match(bm: BlockManager, seq: Sequence) -> int:
    """Match `seq`'s prefix and apply it, as the scheduler does; returns the tokens reused."""
    found = bm.match_prefix(seq)
    found.apply(seq)
    return found.num_tokens


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    compute(bm, seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_cache_reuses_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)))
    compute(bm, a, 12)
    assert bm.num_cached_blocks == 3
    bm.free(a)
    # Same 12-token prompt: at most 8 tokens reused, so at least one token is computed.
    b = make_seq(list(range(12)))
    assert match(bm, b) == 8
    assert b.block_table == a.block_table[:0] or len(b.block_table) == 2
    # A longer prompt sharing the prefix reuses all three blocks.
    c = make_seq(list(range(12)) + [99, 98])
    assert match(bm, c) == 12
    # Different first block: nothing reused, even if later blocks repeat (chained hash).
    d = make_seq([7] + list(range(1, 12)) + [5])
    assert match(bm, d) == 0


def test_shared_blocks_are_refcounted_and_revived_o1():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    b = make_seq([1, 2, 3, 4, 9])
    assert match(bm, b) == 4
    shared = a.block_table[:2]
    assert b.block_table == shared
    assert all(bm.blocks[i].ref_count == 2 for i in shared)
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in shared)
    bm.free(b)
    assert bm.num_free_blocks == 6
    # Revival takes the cached blocks back out of the free queue.
    e = make_seq([1, 2, 3, 4, 0])
    assert match(bm, e) == 4 and bm.num_free_blocks == 4


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    compute(bm, a, 3)
    bm.free(a)
    b = make_seq([5, 6, 7])
    compute(bm, b, 3)  # takes the two never-used blocks
    bm.free(b)
    c = make_seq([8, 9, 10, 11, 12])  # needs 3 blocks: evicts from a's blocks first (older)
    compute(bm, c, 5)
    assert match(bm, make_seq([5, 6, 7])) == 2  # b's prefix survived
    assert make_seq([1, 2, 3]) and match(bm, make_seq([1, 2, 3])) == 0


def test_fork_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6])
    compute(bm, parent, 6)
    child = make_seq([1, 2, 3, 4, 5, 6])
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    last = parent.block_table[-1]
    assert bm.blocks[last].ref_count == 2
    # Both append a token into the partially filled shared last block.
    parent.token_ids.append(7)
    child.token_ids.append(8)
    copies = bm.allocate(child, 1)
    assert copies == [(last, child.block_table[-1])] and child.block_table[-1] != last
    assert bm.blocks[last].ref_count == 1
    assert bm.allocate(parent, 1) == []  # now exclusively owned: written in place
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_free_twice_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_seq([1, 2])
    compute(bm, a, 2)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        bm.free(a)


def test_match_prefix_leaves_the_sequence_alone_until_applied():
    bm = BlockManager(num_blocks=8, block_size=2)
    compute(bm, make_seq([1, 2, 3, 4, 5]), 5)
    b = make_seq([1, 2, 3, 4, 9])
    found = bm.match_prefix(b)
    assert found.num_tokens == 4 and len(found.block_ids) == 2
    assert all(bm.blocks[i].ref_count == 2 for i in found.block_ids)  # referenced for b
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.block_hashes == []
    found.apply(b)
    assert b.block_table == found.block_ids and b.num_computed_tokens == 4
    assert b.num_hashed_blocks == 2


def test_no_blocks_is_an_error():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)


def test_fits_is_exactly_allocation_free():
    """BlockManager.fits (the scheduler's decode shortcut) holds only where can_allocate holds and
    allocate would change nothing: no new block, no copy-on-write; never under a window."""
    import copy

    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_seq(list(range(6)))
    compute(bm, parent, 6)  # blocks: [full, 2 of 4]
    child = make_seq(list(range(6)))
    bm.fork(parent, child)  # the partial block is shared: the next token needs a copy
    child.num_computed_tokens = parent.num_computed_tokens  # as the engine's fork sets it
    lone = make_seq(list(range(8)))
    compute(bm, lone, 7)
    seen = set()
    for seq in (parent, child, lone):
        for n in (0, 1, 2, 3):
            fits = bm.fits(seq, n)
            trial_bm, trial = copy.deepcopy((bm, seq))
            changed = trial_bm.allocate(trial, n) != [] or trial.block_table != seq.block_table
            assert fits == (not changed and bm.can_allocate(seq, n)), (seq.seq_id, n)
            seen.add(fits)
    assert seen == {True, False}
    assert not bm.fits(child, 1)  # copy-on-write
    assert bm.fits(lone, 1) and not bm.fits(lone, 2)
    windowed = BlockManager(num_blocks=16, block_size=4, sliding_window=8)
    s = make_seq(list(range(3)))
    compute(windowed, s, 3)
    assert not windowed.fits(s, 1)
