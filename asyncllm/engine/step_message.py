"""The per-step message from the scheduler to the model runner: plain, picklable data.

The runner never sees a live `Sequence`. It keeps its own state per sequence (token ids, block
table), built from these messages: a sequence it has not seen (new, forked, or resumed after
preemption) arrives whole as `NewSeqData`; one it has seen arrives in `CachedSeqData` with only
what changed since it last appeared (the tokens the host learned, blocks added or replaced, the
number of computed tokens). This is what every tensor-parallel rank process receives
(tp_executor), so it holds only ints and lists of ints (in the spirit of vLLM v1's
SchedulerOutput, not its code).

Sampling stays on the driver, so the runner never knows a sampled token's id until a message
brings it. With async scheduling an input token may still be on the device: `pending_rows` names
its row in the in-flight step's sampled-token tensor, which is passed next to the message (it is
a device tensor, not message data).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NewSeqData:
    """A sequence the runner has no state for."""

    seq_id: int
    token_ids: list[int]  # every token known to the host (prompt + generated so far)
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int
    num_prompt_tokens: int


@dataclass
class CachedSeqData:
    """Deltas for sequences the runner already holds, as parallel lists (one entry each)."""

    seq_ids: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # host-known tokens since last
    # The runner's table becomes table[:block_ids_from] + new_block_ids: an append when
    # block_ids_from is its length, a replacement from there on after a copy-on-write.
    block_ids_from: list[int] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seq_ids)


@dataclass
class StepMessage:
    """One step's work. The batch is `seq_ids` in order; every other per-row list follows it."""

    new_seqs: list[NewSeqData] = field(default_factory=list)
    cached: CachedSeqData = field(default_factory=CachedSeqData)
    seq_ids: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # The row samples a token this step (every token of its sequence is computed after it).
    samples: list[bool] = field(default_factory=list)
    # Row in the in-flight step's sampled tokens of this row's (single) input token; -1: known.
    pending_rows: list[int] = field(default_factory=list)
    # The row wants the logits of every prompt position it computes (prompt_logprobs).
    prompt_logprobs: list[bool] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before forward
    # Sequences finished, aborted or preempted since the last message: the runner drops them.
    # A preempted one that runs again comes back as a NewSeqData.
    dropped_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def empty(self) -> bool:
        return not self.seq_ids
