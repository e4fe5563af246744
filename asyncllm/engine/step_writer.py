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
        sent, replaced = self._sent, self._replaced
        c = msg.cached
        # Bound once: this loop runs for every sequence of every step.
        new_append = msg.new_seqs.append
        c_ids, c_toks, c_from = c.seq_ids.append, c.new_token_ids.append, c.block_ids_from.append
        c_blocks, c_computed = c.new_block_ids.append, c.num_computed_tokens.append
        samples, pending_rows = msg.samples.append, msg.pending_rows.append
        prompt_lp = msg.prompt_logprobs.append
        for item in scheduled:
            seq = item.seq
            sid = seq.seq_id
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            tokens, table = seq.token_ids, seq.block_table
            known = len(tokens)
            prev = sent.get(sid)
            if prev is None:
                new_append(NewSeqData(sid, list(tokens), list(table), start, seq.num_prompt_tokens))
            else:
                n_tok, frm = prev
                if replaced and sid in replaced:
                    frm = min(frm, replaced[sid])
                c_ids(sid)
                c_toks(tokens[n_tok:])
                c_from(frm)
                c_blocks(table[frm:])
                c_computed(start)
            sent[sid] = (known, len(table))
            samples(end == known + seq.num_pending)
            # Only a decode feeds on a token still on the device: the scheduler never schedules a
            # prefill past the known tokens.
            pending_rows(seq.pending_row if end > known else -1)
            prompt_lp(
                seq.request.params.prompt_logprobs is not None
                and start < seq.num_prompt_tokens - 1
                and known == seq.num_prompt_tokens  # no output token yet
                and seq.num_pending == 0
            )
        msg.seq_ids = [item.seq.seq_id for item in scheduled]
        msg.num_new_tokens = [item.num_new_tokens for item in scheduled]
        replaced.clear()
        return msg
