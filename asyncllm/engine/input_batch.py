"""The runner's persistent batch: every sequence's block table in a row of one preallocated table,
and a step's input tensors built with numpy over the whole batch into reused staging buffers.

A decode step changes little: each row's position moves by one, and about one row in block_size
gains a block. Building the inputs from Python lists costs a loop over every table entry of every
row (tens of thousands of ints at batch 256) plus one `pin_memory()` allocation and copy per
tensor. Here a table row is written only where a step's message changes it (a new sequence, an
appended block, a copy-on-write replacement); a step gathers its rows in one numpy `take`, and
all inputs go in two staging buffers (int64 and int32) that cross to the device in two
non-blocking copies. On CUDA the staging buffers are pinned and double-buffered: a buffer is
written again only after the event recorded behind its last copy, so the host may run a step
ahead of the device (async scheduling) without overwriting inputs still in transit.

The tensors a step gets are fresh (a device copy, or a clone on the CPU): nothing handed out
aliases the staging buffers. Rows of the table past a sequence's own length are zero, the
padding the attention kernels were always given.
"""

from __future__ import annotations

import numpy as np
import torch

from asyncllm.engine.layers.attention import AttentionMetadata


class _Staging:
    """One pair of host buffers (pinned on CUDA) and the event behind their last copy."""

    def __init__(self, n64: int, n32: int, pin: bool) -> None:
        self.t64 = torch.empty(n64, dtype=torch.int64, pin_memory=pin)
        self.t32 = torch.empty(n32, dtype=torch.int32, pin_memory=pin)
        self.a64, self.a32 = self.t64.numpy(), self.t32.numpy()
        self.event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class PersistentBatch:
    def __init__(
        self, block_size: int, device: torch.device, rows: int = 64, width: int = 64
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.pin = device.type == "cuda"
        self.tables = np.zeros((max(rows, 1), max(width, 1)), dtype=np.int32)
        self._free = list(range(self.tables.shape[0] - 1, -1, -1))
        self._staging = [_Staging(1024, 1024, self.pin) for _ in range(2 if self.pin else 1)]
        self._turn = 0

    # ---- table rows ---------------------------------------------------------------------------
    def acquire(self, blocks: list[int]) -> int:
        """A row for a new sequence, holding `blocks`."""
        if not self._free:
            rows = self.tables.shape[0]
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free.pop()
        self.write(row, 0, blocks, 0)
        return row

    def release(self, row: int, length: int) -> None:
        self.tables[row, :length] = 0
        self._free.append(row)

    def write(self, row: int, frm: int, blocks: list[int], old_len: int) -> None:
        """The row's table becomes table[:frm] + blocks (it held `old_len` entries)."""
        end = frm + len(blocks)
        if end > self.tables.shape[1]:
            grown = np.zeros((self.tables.shape[0], max(end, 2 * self.tables.shape[1])), np.int32)
            grown[:, : self.tables.shape[1]] = self.tables
            self.tables = grown
        if blocks:
            self.tables[row, frm:end] = blocks
        if end < old_len:
            self.tables[row, end:old_len] = 0

    # ---- one step -----------------------------------------------------------------------------
    def _stage(self, n64: int, n32: int) -> _Staging:
        k = self._turn
        self._turn = (k + 1) % len(self._staging)
        st = self._staging[k]
        st.wait()  # its previous copy (two steps back on CUDA) has landed
        if st.a64.shape[0] < n64 or st.a32.shape[0] < n32:
            st = self._staging[k] = _Staging(
                max(n64, 2 * st.a64.shape[0]), max(n32, 2 * st.a32.shape[0]), self.pin
            )
        return st

    def _ship(self, st: _Staging, n64: int, n32: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pin:
            return st.t64[:n64].clone(), st.t32[:n32].clone()
        d64 = st.t64[:n64].to(self.device, non_blocking=True)
        d32 = st.t32[:n32].to(self.device, non_blocking=True)
        st.event = torch.cuda.Event()
        st.event.record()
        return d64, d32

    def build(
        self,
        rows: np.ndarray,
        starts: np.ndarray,
        num_new: list[int],
        width: int,
        pending: list[int],
        token_ids: list[list[int]] | None,
        prev_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Inputs of one step: row b is table row `rows[b]`, computing `num_new[b]` tokens from
        position `starts[b]`; `pending[b]` >= 0: its one input token is row pending[b] of
        `prev_tokens`. `token_ids`: each row's known tokens (None when every row is pending)."""
        bs = self.block_size
        b = len(num_new)
        nn = np.array(num_new, dtype=np.int64)
        total = int(nn.sum())
        decode_only = total == b
        pend = np.array(pending, dtype=np.int64)
        fill = np.flatnonzero(pend >= 0)
        nf = len(fill)
        n64 = 3 * total + 2 * nf
        n32 = 2 * b + 1 + b * width
        st = self._stage(n64, n32)
        a64, a32 = st.a64, st.a32
        ids, pos, slots = a64[:total], a64[total : 2 * total], a64[2 * total : 3 * total]
        qsl = a32[: b + 1]
        seq_lens = a32[b + 1 : 2 * b + 1]
        tables = a32[2 * b + 1 : n32].reshape(b, width)

        qsl[0] = 0
        np.cumsum(nn, out=qsl[1:])
        ends = starts + nn
        seq_lens[:] = ends
        if decode_only:
            pos[:] = starts
            tok_rows = rows
        else:
            # Token t of row r sits at starts[r] + (t - qsl[r]).
            pos[:] = np.arange(total) + np.repeat(starts - qsl[:-1], nn)
            tok_rows = np.repeat(rows, nn)
        slots[:] = self.tables[tok_rows, pos // bs]
        slots *= bs
        slots += pos % bs
        np.take(self.tables[:, :width], rows, axis=0, out=tables)
        if nf == b and decode_only:
            ids[:] = 0
        else:
            assert token_ids is not None
            flat: list[int] = []
            for toks, s, n, p in zip(token_ids, starts.tolist(), num_new, pending, strict=True):
                if p >= 0:
                    flat.append(0)
                else:
                    flat += toks[s : s + n]
            ids[:] = flat
        if nf:
            a64[3 * total : 3 * total + nf] = qsl[fill]
            a64[3 * total + nf : n64] = pend[fill]
        d64, d32 = self._ship(st, n64, n32)
        meta = AttentionMetadata(
            query_start_loc=d32[: b + 1],
            seq_lens=d32[b + 1 : 2 * b + 1],
            slot_mapping=d64[2 * total : 3 * total],
            block_tables=d32[2 * b + 1 :].view(b, width),
            max_query_len=int(nn.max()),
            max_seq_len=int(ends.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=ends.tolist(),
            decode_only=decode_only,
        )
        ids_t = d64[:total]
        if nf:
            assert prev_tokens is not None
            dst = d64[3 * total : 3 * total + nf]
            src = d64[3 * total + nf : n64]
            ids_t.index_copy_(0, dst, prev_tokens[src])
        return ids_t, d64[total : 2 * total], meta
