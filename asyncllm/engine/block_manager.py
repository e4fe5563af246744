"""Paged KV blocks: reference counts, copy-on-write, and a prefix cache.

A full block is identified by a chained hash (hash of the parent block's hash and this block's
tokens), so a block's identity covers the whole prefix before it. Freed blocks keep their hash and
stay in the free queue; a later request with the same prefix revives them in O(1). Allocation takes
the least recently freed block, evicting its cached identity (LRU).

Sliding windows: when every layer of the model attends within a window (Mistral), a block wholly
before the window of a sequence's next token is never read again, so `release_outside_window`
gives it back (its table entry becomes NULL_BLOCK; a full block stays cached for prefix hits until
it is evicted) and a long sequence holds about window + chunk tokens of cache. A model with any
full-attention layer (Gemma's global layers) keeps every block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from asyncllm.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # checked on a hit, so a hash collision cannot alias


@dataclass
class PrefixMatch:
    """What match_prefix found: the cached blocks (already referenced) that hold the prefix."""

    block_ids: list[int]
    num_tokens: int  # tokens those blocks hold: they need no computing
    block_hashes: list[int]  # the sequence's chained block hashes, as far as they were computed

    def apply(self, seq: Sequence) -> None:
        seq.block_table = list(self.block_ids)
        seq.num_hashed_blocks = len(self.block_ids)
        seq.num_computed_tokens = self.num_tokens
        seq.block_hashes = self.block_hashes


# A table entry whose block was released (wholly outside every layer's window); attention never
# reads it (the kernels start at the window).
NULL_BLOCK = -1


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        """`sliding_window`: the largest window when every layer has one (else None): how far
        back any layer reads."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. Values unused: an ordered set.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hit_tokens = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached-but-unreferenced blocks count as free)."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(seq.block_table)
        if self._needs_cow(seq, num_new_tokens):
            need += 1
        return max(need, 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def fits(self, seq: Sequence, num_new_tokens: int) -> bool:
        """`num_new_tokens` more tokens land in blocks `seq` already holds alone: no allocation,
        no copy-on-write (so can_allocate holds and allocate would do nothing). One check for the
        common decode step (15 tokens of 16 land in the last block). False under a sliding
        window, whose blocks are released first (release_outside_window)."""
        if self.sliding_window is not None:
            return False
        c = seq.num_computed_tokens
        table = seq.block_table
        bs = self.block_size
        if c + num_new_tokens > len(table) * bs:
            return False
        return num_new_tokens == 0 or c % bs == 0 or self.blocks[table[c // bs]].ref_count == 1

    def max_blocks_held(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks one sequence of `num_tokens` tokens holds at once, computed in chunks
        of at most `max_chunk` tokens: all of them, or under a window the window before a chunk
        plus the chunk (and a partial block at each end)."""
        whole = -(-num_tokens // self.block_size)
        if self.sliding_window is None:
            return whole
        span = self.sliding_window - 1 + min(max_chunk, num_tokens)
        return min(whole, -(-span // self.block_size) + 1)

    def release_outside_window(self, seq: Sequence) -> int:
        """Give back `seq`'s blocks that lie wholly before the window of its next token (every
        layer's window); returns how many. Their entries become NULL_BLOCK."""
        if self.sliding_window is None:
            return 0
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        end = min(max(first_needed, 0) // self.block_size, len(seq.block_table))
        table, released = seq.block_table, 0
        for j in range(seq.num_released_blocks, end):
            block_id = table[j]
            if block_id != NULL_BLOCK:
                self._unref(block_id)
                table[j] = NULL_BLOCK
                released += 1
        seq.num_released_blocks = max(seq.num_released_blocks, end)
        return released

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    # ---- allocation -------------------------------------------------------------------------
    def _pop_free(self) -> Block:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict its cached identity: it is about to hold other tokens.
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block

    def _needs_cow(self, seq: Sequence, num_new_tokens: int) -> bool:
        # Writing into a partially filled last block that another sequence also references.
        if num_new_tokens == 0 or seq.num_computed_tokens % self.block_size == 0:
            return False
        idx = seq.num_computed_tokens // self.block_size
        return idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` room for `num_new_tokens` more tokens. Returns (src, dst) block copies that
        must happen before the step's forward (copy-on-write). Caller checked can_allocate."""
        copies: list[tuple[int, int]] = []
        if self._needs_cow(seq, num_new_tokens):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            self.blocks[src].ref_count -= 1  # still > 0: another sequence holds it
            dst = self._pop_free().block_id
            seq.block_table[idx] = dst
            copies.append((src, dst))
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._pop_free().block_id)
        return copies

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so they are evicted before the shared prefix blocks.
        for block_id in reversed(seq.block_table):
            if block_id != NULL_BLOCK:
                self._unref(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_released_blocks = 0
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.num_released_blocks = parent.num_released_blocks
        child.block_hashes = list(parent.block_hashes)
        for block_id in child.block_table:
            if block_id != NULL_BLOCK:
                self.blocks[block_id].ref_count += 1

    # ---- prefix cache -----------------------------------------------------------------------
    def _hash_of_block(self, seq: Sequence, i: int) -> int:
        """The chained hash of `seq`'s i-th full block (computed once per sequence)."""
        self._extend_hashes(seq.token_ids, seq.block_hashes, i + 1)
        return seq.block_hashes[i]

    def _extend_hashes(self, token_ids: list[int], hashes: list[int], n: int) -> None:
        """Extend `hashes` with the chained hashes of the blocks after it, up to `n` of them."""
        bs = self.block_size
        while len(hashes) < n:
            j = len(hashes)
            hashes.append(
                chain_hash(hashes[j - 1] if j else None, tuple(token_ids[j * bs : (j + 1) * bs]))
            )

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Reference every cached block of `seq`'s prefix and return them; `seq` is not changed
        (the scheduler applies the match: `PrefixMatch.apply`).

        At least one token is always left to compute, so the step has logits to sample from."""
        hashes = list(seq.block_hashes)
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens:
            return PrefixMatch([], 0, hashes)
        block_ids: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            self._extend_hashes(seq.token_ids, hashes, i + 1)
            block_id = self.hash_to_block.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            toks = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.token_ids != toks:
                break
            if block.ref_count == 0:
                del self.free_queue[block_id]  # revive: O(1)
            block.ref_count += 1
            block_ids.append(block_id)
        num_tokens = len(block_ids) * self.block_size
        self.prefix_hit_tokens += num_tokens
        return PrefixMatch(block_ids, num_tokens, hashes)

    def unmatch_prefix(self, seq: Sequence) -> None:
        """Undo match_prefix for a waiting sequence that could not be scheduled after all."""
        if not seq.block_table:
            return
        self.prefix_hit_tokens -= seq.num_computed_tokens
        self.free(seq)
        seq.num_computed_tokens = 0

    def register_computed(self, seq: Sequence) -> None:
        """Publish `seq`'s newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        # Pending tokens (async scheduling) are computed but not yet known: not hashable yet.
        known = min(seq.num_computed_tokens, len(seq.token_ids))
        num_full = min(known // self.block_size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, num_full):
            if seq.block_table[i] == NULL_BLOCK:
                continue  # released before it could be published
            h = self._hash_of_block(seq, i)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and h not in self.hash_to_block:
                block.block_hash = h
                block.token_ids = tuple(
                    seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
                )
                self.hash_to_block[h] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.hash_to_block.clear()
