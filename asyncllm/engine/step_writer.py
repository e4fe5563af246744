"""Writes the scheduler's step as a `StepMessage`: remembers what the runner already holds of each
sequence, so a sequence it knows gets only what changed since it was last sent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncllm.engine.step_message import NewSeqData, StepMessage

if TYPE_CHECKING:
    from asyncllm.engine.scheduler import ScheduledSeq
    from asyncllm.engine.sequence import Sequence


class StepWriter:
    def __init__(self) -> None:
        # seq_id -> (known tokens sent, block-table entries sent) for each sequence the runner holds
        self._sent: dict[int, tuple[int, int]] = {}
        self._replaced: dict[int, int] = {}  # seq_id -> first table index replaced this step
        self._dropped: list[int] = []

    def drop(self, seq: Sequence) -> None:
        """`seq` finished, was aborted or preempted: the runner forgets it with the next step."""
        if self._sent.pop(seq.seq_id, None) is not None:
            self._dropped.append(seq.seq_id)
        self._replaced.pop(seq.seq_id, None)

    def replaced_block(self, seq: Sequence, index: int) -> None:
        """Copy-on-write put another block at `index` of `seq`'s table."""
        sid = seq.seq_id
        self._replaced[sid] = min(index, self._replaced.get(sid, index))

    def write(
        self, scheduled: list[ScheduledSeq], block_copies: list[tuple[int, int]]
    ) -> StepMessage:
        if not scheduled:
            return StepMessage()  # nothing runs: the drops wait for the next message
        msg = StepMessage(block_copies=list(block_copies), dropped_seq_ids=self._dropped)
        self._dropped = []
        cached = msg.cached
        sent = self._sent
        for item in scheduled:
            seq = item.seq
            sid = seq.seq_id
            start = seq.num_computed_tokens
            known = len(seq.token_ids)
            table = seq.block_table
            prev = sent.get(sid)
            if prev is None:
                msg.new_seqs.append(
                    NewSeqData(sid, list(seq.token_ids), list(table), start, seq.num_prompt_tokens)
                )
            else:
                n_tok, n_blk = prev
                frm = min(n_blk, self._replaced.pop(sid, n_blk))
                cached.seq_ids.append(sid)
                cached.new_token_ids.append(seq.token_ids[n_tok:] if known > n_tok else [])
                cached.block_ids_from.append(frm)
                cached.new_block_ids.append(table[frm:] if len(table) > frm else [])
                cached.num_computed_tokens.append(start)
            sent[sid] = (known, len(table))
            n = item.num_new_tokens
            msg.seq_ids.append(sid)
            msg.num_new_tokens.append(n)
            msg.samples.append(start + n == seq.num_tokens)
            # Only a decode feeds on a token still on the device: the scheduler never schedules a
            # prefill past the known tokens.
            msg.pending_rows.append(seq.pending_row if start + n > known else -1)
            msg.prompt_logprobs.append(
                seq.request.params.prompt_logprobs is not None
                and start < seq.num_prompt_tokens - 1
                and seq.num_output_tokens == 0
                and seq.num_pending == 0
            )
        self._replaced.clear()
        return msg
