"""Continuous batching: one token budget per step, spent on running sequences first (decodes and
unfinished prompt chunks), then on chunks of waiting prompts. There is no prefill or decode phase.

While some sequence is decoding, prompt chunks share a smaller budget (`max_prefill_tokens`), so
a long prompt cannot stall the decodes; with `prefill_context_scale` a chunk's tokens are charged
for the context they attend over (`prefill_cost`), so the chunk shrinks as the prompt's prefix
grows and a step beside a long prompt costs about the same at 8k tokens of context as at 0.

When KV blocks run out, the lowest-priority, latest-arrived running sequence is preempted: its
blocks are freed and it waits to be recomputed (its generated tokens are kept, so it resumes with
the same output).

Each step's output carries `step`, the plain message the model runner reads (step_message.py,
written by step_writer.py); the live sequences stay on this side.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from asyncllm import envs
from asyncllm.config import SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.sequence import Sequence, SequenceStatus
from asyncllm.engine.step_message import StepMessage
from asyncllm.engine.step_writer import StepWriter


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is computed: it samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The driver's view of a step (live sequences) and `step`, the runner's (plain data)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    step: StepMessage = field(default_factory=StepMessage)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


# A chunk also pays once for the whole prefix it attends over, whatever its size (the CPU path
# gathers the prefix's K/V out of the paged cache and builds an n x context mask): measured as
# the cost of this many prompt tokens at context `scale` (SmolLM2-135M, one CPU thread, CPU time:
# 8 tokens at 7936 of context cost 4.1x 8 tokens at 0, 64 tokens 5.5x; ops/bench/NOTES.md).
CHUNK_CONTEXT_TOKENS = 10


def prefill_cost(num_tokens: int, context: int, scale: int | None) -> float:
    """The budget `num_tokens` prompt tokens take when `context` tokens before them are already
    computed: each token at position p costs 1 + p / scale (its attention reads p keys besides
    the fixed per-token work of the linears), summed over context..context+num_tokens-1, and
    the chunk CHUNK_CONTEXT_TOKENS * context / scale for reading the prefix once."""
    if scale is None:
        return float(num_tokens)
    if num_tokens <= 0:
        return 0.0
    per_token = num_tokens + num_tokens * (2 * context + num_tokens - 1) / (2 * scale)
    return per_token + CHUNK_CONTEXT_TOKENS * context / scale


def prefill_chunk(limit: int, context: int, budget: float, scale: int | None) -> int:
    """The most tokens (<= limit) starting at `context` whose prefill_cost fits in `budget`."""
    if limit <= 0 or budget <= 0:
        return 0
    if scale is None:
        return min(limit, int(budget))
    rest = budget - CHUNK_CONTEXT_TOKENS * context / scale
    if rest <= 0:
        return 0
    # n^2 / 2s + n (1 + (2c - 1) / 2s) - rest <= 0: the positive root, then exact checks
    # (floating point), so the chunk is the largest that fits.
    a, b = 1 / (2 * scale), 1 + (2 * context - 1) / (2 * scale)
    n = min(limit, int((-b + math.sqrt(b * b + 4 * a * rest)) / (2 * a)))
    while n > 0 and prefill_cost(n, context, scale) > budget:
        n -= 1
    while n < limit and prefill_cost(n + 1, context, scale) <= budget:
        n += 1
    return n


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.num_preemptions = 0
        self.writer = StepWriter()  # what the runner knows of each sequence; writes the message
        self.fastpath = envs.host_fastpath()  # BlockManager.fits before the allocator

    # ---- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence) -> None:
        """Remove `seq` from whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.writer.drop(seq)
        seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        self.writer.drop(seq)
        seq.num_computed_tokens = 0
        self.num_preemptions += 1
        self.add(seq)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Prompt chunks share a smaller budget, so a long prompt cannot stall running decodes
        # (with none running there is nobody to stall: prompts get the whole budget).
        prefill: float = budget
        scale = None  # context pricing applies with the cap only: nobody to stall otherwise
        cap = self.config.max_prefill_tokens
        if cap is not None and any(
            len(s.token_ids) + s.num_pending - s.num_computed_tokens == 1 for s in self.running
        ):
            prefill = cap
            scale = self.config.prefill_context_scale
        # One prompt token per step always goes, however deep its context: prompts progress.
        first_chunk = True
        bm = self.block_manager
        scheduled_ids: set[int] = set()
        fast = self.fastpath
        # The decode fast path's loop invariants, bound once (it runs for every running sequence).
        running = self.running
        max_len = self.config.max_model_len
        bs = bm.block_size
        blocks = bm.blocks
        fast_decode = fast and bm.sliding_window is None
        append, mark = out.scheduled.append, scheduled_ids.add

        # 1. Running sequences, highest priority first; preempt from the back when out of blocks.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if fast_decode:
                # A decode whose token lands in a block it holds alone (BlockManager.fits) and
                # that does not end by length (Sequence.ends_by_length, pending tokens counted),
                # inlined: this is most sequences of most steps.
                tokens, pend, c = seq.token_ids, seq.num_pending, seq.num_computed_tokens
                total = len(tokens) + pend
                if total - c == 1:
                    if pend:
                        mt = seq.request.params.max_tokens
                        if total >= max_len or (
                            mt is not None and total - seq.num_prompt_tokens >= mt
                        ):
                            i += 1
                            continue
                    table = seq.block_table
                    if c < len(table) * bs and (
                        c % bs == 0 or blocks[table[c // bs]].ref_count == 1
                    ):
                        append(ScheduledSeq(seq, 1))
                        mark(seq.seq_id)
                        budget -= 1
                        i += 1
                        continue
            is_prefill = seq.num_uncomputed_tokens > 1
            if is_prefill:
                num_new = self._chunk(seq, budget, prefill, scale, first_chunk)
            else:
                num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0 or (seq.num_pending and seq.ends_by_length(self.config.max_model_len)):
                i += 1
                continue
            if fast and bm.fits(seq, num_new):
                # Room already held (most decode steps): no allocator, no preemption check.
                out.scheduled.append(ScheduledSeq(seq, num_new))
                scheduled_ids.add(seq.seq_id)
                budget -= num_new
                if is_prefill:  # the same prefill bookkeeping as the allocating path below
                    prefill -= prefill_cost(num_new, seq.num_computed_tokens, scale)
                    first_chunk = False
                i += 1
                continue
            # Blocks behind every layer's window come back before this sequence asks for more.
            bm.release_outside_window(seq)
            while not bm.can_allocate(seq, num_new):
                victim = self.running[-1]
                if victim.seq_id in scheduled_ids:
                    # Everything behind `seq` is gone; scheduled ones keep their room this step.
                    victim = seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._allocate(seq, num_new, out)
                scheduled_ids.add(seq.seq_id)
                if is_prefill:
                    prefill -= prefill_cost(num_new, seq.num_computed_tokens, scale)
                    first_chunk = False
                budget -= num_new
                i += 1
                continue
            # `seq` itself was preempted: whatever follows it has lower priority and is gone too.
            break

        # 2. Waiting sequences, only if nothing had to be preempted (memory is tight otherwise).
        while self.waiting and budget > 0 and (prefill > 0 or first_chunk) and not out.preempted:
            seq = self.waiting[0]
            if seq.num_pending:
                # Preempted while its last token was in flight: that token is unknown until the
                # step resolves (later in this engine step), and a prefill cannot feed on it.
                break
            width = 1 if seq.request.forked else seq.request.params.n
            if len(self.running) + width > self.config.max_num_seqs:
                break
            if not seq.block_table and seq.num_computed_tokens == 0:
                if seq.request.params.prompt_logprobs is None:
                    match = bm.match_prefix(seq)
                    match.apply(seq)
                    cached = match.num_tokens
                    if seq.request.num_cached_tokens == 0 and seq.num_output_tokens == 0:
                        seq.request.num_cached_tokens = cached
            num_new = self._chunk(seq, budget, prefill, scale, first_chunk)
            if num_new == 0:  # the prefill budget is spent at this prompt's context
                bm.unmatch_prefix(seq)
                break
            bm.release_outside_window(seq)  # a long cached prefix matched beyond the window
            if not bm.can_allocate(seq, num_new):
                # A waiting sequence must not sit on the cached blocks it matched: with several
                # such sequences (preempted ones re-match their own blocks) nothing is left to
                # run. The blocks stay cached; the next attempt matches them again.
                bm.unmatch_prefix(seq)
                if not self.running and not out.scheduled:
                    # Nothing will ever free a block for it: the request cannot fit in the cache.
                    raise RuntimeError(
                        f"request {seq.request.request_id} needs more KV blocks than the cache "
                        f"has ({bm.num_blocks}); raise kv_cache_memory or lower max_model_len"
                    )
                break
            self.waiting.pop(0)
            self.add_running(seq)
            prefill -= prefill_cost(num_new, seq.num_computed_tokens, scale)
            first_chunk = False
            self._allocate(seq, num_new, out)
            budget -= num_new
        out.step = self.writer.write(out.scheduled, out.block_copies)
        return out

    @staticmethod
    def _chunk(seq: Sequence, budget: int, prefill: float, scale: int | None, first: bool) -> int:
        """Prompt tokens of `seq` this step: within the step's token budget and what is left of
        the prefill budget at its context (at least one for the step's first chunk)."""
        limit = min(seq.num_uncomputed_tokens, budget)
        n = prefill_chunk(limit, seq.num_computed_tokens, prefill, scale)
        return max(n, 1) if first and limit > 0 else n

    def _allocate(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None:
        copies = self.block_manager.allocate(seq, num_new)
        if copies:
            # Copy-on-write replaced the block the next token lands in.
            self.writer.replaced_block(
                seq, seq.num_computed_tokens // self.block_manager.block_size
            )
        out.block_copies += copies
        out.scheduled.append(ScheduledSeq(seq, num_new))
