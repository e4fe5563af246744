"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample from.

One flattened batch per step: the new tokens of every scheduled sequence, concatenated. Inputs are
built on the host and copied once (pinned, non-blocking on CUDA). Decode-only batches may replay a
captured CUDA graph.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np
import torch

from asyncllm import envs
from asyncllm.config import CacheConfig, ModelConfig, SchedulerConfig
from asyncllm.engine import distributed
from asyncllm.engine.input_batch import PersistentBatch
from asyncllm.engine.layers.attention import AttentionMetadata
from asyncllm.engine.step_message import StepMessage

_ARRAY_CODES = {torch.int32: "i", torch.int64: "q"}


@dataclass
class StepLogits:
    # Logits of the last token of each sequence that samples this step, in `sample_seqs` order.
    sample_logits: torch.Tensor | None
    sample_index: list[int]  # index into the step's batch for each row of sample_logits
    # For sequences that asked for prompt logprobs: scheduled index -> (logits [k,V], first position)
    prompt_logits: dict[int, tuple[torch.Tensor, int]]


@dataclass
class SeqState:
    """The runner's copy of a sequence, built only from step messages."""

    token_ids: list[int]  # the tokens the host knew when it last sent this sequence
    block_table: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int
    row: int = -1  # its row of the persistent batch's block table


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one KV block on one rank."""
    from asyncllm.engine.models import kv_cache_shape

    layers, kv_heads, head_dim = kv_cache_shape(hf_config, tp_size)
    return (
        2 * layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    )


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        model: torch.nn.Module,
        attn_backend,
    ):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.model = model
        self.attn_backend = attn_backend
        self.device = model_config.device
        self.dtype = model_config.dtype
        self.block_size = cache_config.block_size
        self.pin = self.device.type == "cuda"
        self.kv_caches: list[torch.Tensor] = []
        self.graph_runner = None  # set by enable_cuda_graphs on CUDA
        self.states: dict[int, SeqState] = {}  # seq_id -> state, from the step messages
        self.tp_size = distributed.get_tp_size()  # this rank's share of the KV heads
        # The table rows are kept up to date either way, so the switch may flip between steps.
        self.batch = PersistentBatch(
            self.block_size,
            self.device,
            scheduler_config.max_num_seqs,
            -(-model_config.max_model_len // self.block_size),
        )
        self.persistent = envs.persistent_batch()

    # ---- KV cache ---------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        from asyncllm.engine.models import kv_cache_shape

        layers, kv_heads, head_dim = kv_cache_shape(self.model_config.hf_config, self.tp_size)
        shape = (2, num_blocks, self.block_size, kv_heads, head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = self._to_device([c[0] for c in copies], torch.int64)
        dst = self._to_device([c[1] for c in copies], torch.int64)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    # ---- one step ---------------------------------------------------------------------------
    def _to_device(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        if self.pin and data and dtype in _ARRAY_CODES:
            # array.array converts a list of ints 3x faster than torch.tensor (a decode step's
            # block tables are tens of thousands of ints); pin_memory copies it out of the array.
            t = torch.frombuffer(array.array(_ARRAY_CODES[dtype], data), dtype=dtype).pin_memory()
            return t.to(self.device, non_blocking=True)
        t = torch.tensor(data, dtype=dtype, pin_memory=self.pin)
        return t.to(self.device, non_blocking=True) if self.pin else t

    def update_states(self, step: StepMessage) -> None:
        """Bring the per-sequence state up to `step`: drops, new sequences, deltas."""
        states, batch = self.states, self.batch
        for sid in step.dropped_seq_ids:
            st = states.pop(sid, None)
            if st is not None:
                batch.release(st.row, len(st.block_table))
        for new in step.new_seqs:
            old = states.get(new.seq_id)
            if old is not None:  # not dropped first (a test's hand-written message)
                batch.release(old.row, len(old.block_table))
            table = list(new.block_ids)
            states[new.seq_id] = SeqState(
                list(new.token_ids),
                table,
                new.num_computed_tokens,
                new.num_prompt_tokens,
                batch.acquire(table),
            )
        c = step.cached
        for sid, toks, frm, blocks, computed in zip(
            c.seq_ids,
            c.new_token_ids,
            c.block_ids_from,
            c.new_block_ids,
            c.num_computed_tokens,
            strict=True,
        ):
            st = states[sid]
            if toks:
                st.token_ids += toks
            table = st.block_table
            if blocks or frm != len(table):
                old_len = len(table)
                del table[frm:]
                table += blocks
                batch.write(st.row, frm, blocks, old_len)
            st.num_computed_tokens = computed

    def prepare(
        self, step: StepMessage, prev_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Inputs of `step`'s batch from the runner's own state (update_states first).
        `prev_tokens`: the in-flight step's sampled tokens on the device (async scheduling); a
        row whose input is still pending reads it from `prev_tokens[step.pending_rows[i]]`."""
        if not self.persistent:
            return self._prepare_lists(step, prev_tokens)
        states = self.states
        rows = [states[sid] for sid in step.seq_ids]
        n = len(rows)
        table_rows = np.fromiter((st.row for st in rows), np.int64, n)
        starts = np.fromiter((st.num_computed_tokens for st in rows), np.int64, n)
        width = max(len(st.block_table) for st in rows)
        pending = step.pending_rows
        every_pending = min(pending) >= 0
        if every_pending:
            assert prev_tokens is not None
        return self.batch.build(
            table_rows,
            starts,
            step.num_new_tokens,
            width,
            pending,
            None if every_pending else [st.token_ids for st in rows],
            prev_tokens,
        )

    def _prepare_lists(
        self, step: StepMessage, prev_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """`prepare` from Python lists, one pinned copy per tensor (ASYNCLLM_PERSISTENT_BATCH=0)."""
        bs = self.block_size
        input_ids: list[int] = []
        fill_dst: list[int] = []  # positions in input_ids whose token is still on the device
        fill_src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        rows = [self.states[sid] for sid in step.seq_ids]
        width = max(len(st.block_table) for st in rows)
        tables: list[int] = []
        for st, num_new, pending_row in zip(
            rows, step.num_new_tokens, step.pending_rows, strict=True
        ):
            start = st.num_computed_tokens
            end = start + num_new
            if pending_row >= 0:
                assert end == len(st.token_ids) + 1 == start + 1 and prev_tokens is not None
                fill_dst.append(len(input_ids))
                fill_src.append(pending_row)
                input_ids.append(0)
            else:
                input_ids += st.token_ids[start:end]
            positions += range(start, end)
            table = st.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + num_new)
            seq_lens.append(end)
            tables += table + [0] * (width - len(table))
        meta = AttentionMetadata(
            query_start_loc=self._to_device(qsl, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(tables, torch.int32).view(len(rows), width),
            max_query_len=max(step.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            decode_only=all(n == 1 for n in step.num_new_tokens),
        )
        ids = self._to_device(input_ids, torch.int64)
        if fill_dst:
            assert prev_tokens is not None
            src = self._to_device(fill_src, torch.int64)
            ids.index_copy_(0, self._to_device(fill_dst, torch.int64), prev_tokens[src])
        pos = self._to_device(positions, torch.int64)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, step: StepMessage, prev_tokens: torch.Tensor | None = None) -> StepLogits:
        """Run one step: block copies, then one forward over `step`'s batch, then the logits the
        driver samples from (and those of prompt positions for rows that asked for them).
        `prev_tokens`: see `prepare`."""
        self.copy_blocks(step.block_copies)
        self.update_states(step)
        ids, pos, meta = self.prepare(step, prev_tokens)
        if self.graph_runner is not None and meta.decode_only and self.graph_runner.can_run(meta):
            hidden = self.graph_runner.run(ids, pos, meta)
        else:
            hidden = self.model(ids, pos, self.kv_caches, meta)

        sample_index = [i for i, samples in enumerate(step.samples) if samples]
        last_rows = [meta.query_start_loc_cpu[i + 1] - 1 for i in sample_index]
        sample_logits = None
        if last_rows:
            rows = last_rows
            if len(rows) != hidden.shape[0]:
                hidden_sel = hidden[self._to_device(rows, torch.int64)]
            else:
                hidden_sel = hidden
            sample_logits = self.model.compute_logits(hidden_sel)

        prompt_logits: dict[int, tuple[torch.Tensor, int]] = {}
        for i, want in enumerate(step.prompt_logprobs):
            if not want:
                continue
            st = self.states[step.seq_ids[i]]
            start = st.num_computed_tokens
            # Only positions inside the prompt predict prompt tokens: position p predicts p+1.
            last = min(start + step.num_new_tokens[i], st.num_prompt_tokens - 1)
            if last <= start:
                continue
            a = meta.query_start_loc_cpu[i]
            prompt_logits[i] = (self.model.compute_logits(hidden[a : a + last - start]), start)
        return StepLogits(sample_logits, sample_index, prompt_logits)
