"""Paged attention: the metadata of one step, the backend interface, and the torch reference.

Backends are looked up by name in asyncllm.engine.layers.attention_backends (which imports this
module and the Triton one; neither imports it back), chosen once at start-up by
asyncllm.engine.kernel_paths.

KV cache: one tensor per layer, `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = K,
1 = V). A flat slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from asyncllm.engine.kernels import cpu_decode_attention


@dataclass
class AttentionMetadata:
    """One step's flattened batch: the new tokens of B sequences, T in all."""

    query_start_loc: Tensor  # int32 [B+1] cumulative new-token counts (device)
    seq_lens: Tensor  # int32 [B] context length after this step: cached + new (device)
    slot_mapping: Tensor  # int64 [T] slot for each new token's K/V; -1 = do not write
    block_tables: Tensor  # int32 [B, max_blocks] block ids per sequence, padded with 0 (device)
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies, for backends that loop in Python
    seq_lens_cpu: list[int]
    decode_only: bool  # every sequence has exactly one new token


class AttentionBackend:
    """Writes the new K/V into the paged cache, then attends causally within each sequence.

    Two per-layer properties come with each call (a model mixes layers that differ in them):
    `sliding_window` W (a query at position i sees keys j with i - W < j <= i, as transformers'
    sliding-window mask; None = the whole context) and `logits_soft_cap` c (scores become
    c * tanh(score / c) before the softmax, Gemma 2; None = off)."""

    name: str = "base"

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> Tensor:
        """q [T,Hq,D], k/v [T,Hkv,D] -> [T,Hq,D]. The new tokens of sequence b are the last
        query_len positions of seq_lens[b]. Hq % Hkv == 0."""
        raise NotImplementedError


def write_kv_cache(
    k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor, ops: Any = None
) -> None:
    """Store each new token's K/V at its flat slot; slots of -1 (padding) are skipped. With the
    CPU's fused ops (asyncllm.engine.kernels.cpu_fused) one C call instead of the torch ops."""
    write = getattr(ops, "write_kv_cache", None)
    if write is not None and write(k, v, kv_cache, slot_mapping):
        return
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)
    keep = slot_mapping >= 0
    # One host sync; the reference backend is allowed it and the common case skips the masking.
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(
    kv_cache: Tensor, block_table: Tensor, length: int, first: int = 0
) -> tuple[Tensor, Tensor]:
    """Cached K and V of positions first..length-1 of one sequence: [length - first, Hkv, D]
    each. `first` is a multiple of the block size (blocks before it may be freed)."""
    block_size = kv_cache.shape[2]
    n = -(-length // block_size)
    # index_select: several times faster than advanced indexing behind a leading slice.
    ids = block_table[first // block_size : n].long()
    blocks = kv_cache.index_select(1, ids)  # [2, n', bs, H, D]
    blocks = blocks.flatten(1, 2)[:, : length - first]
    return blocks[0], blocks[1]


class TorchAttentionBackend(AttentionBackend):
    """The reference backend (CPU or any device): gathers each sequence's blocks and calls SDPA.

    Decode-only work (query_len 1) runs as one padded, masked SDPA over all such sequences (on
    the CPU in float32: the paged C kernel instead, `ASYNCLLM_CPU_ATTENTION=torch` to force the
    SDPA path); prefills loop per sequence.

    `decode_kernel`: whether float32 CPU decodes take the paged C kernel (None: what
    `ASYNCLLM_CPU_ATTENTION` says, read here, once). `fused_ops`: the fused-op module whose
    `write_kv_cache` stores the new K/V (the CPU's C one), or None for the torch ops."""

    name = "torch"

    def __init__(self, decode_kernel: bool | None = None, fused_ops: Any = None):
        if decode_kernel is None:
            decode_kernel = cpu_decode_attention.enabled()
        self.decode_kernel = decode_kernel
        self.fused_ops = fused_ops if hasattr(fused_ops, "write_kv_cache") else None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, self.fused_ops)
        qsl = meta.query_start_loc_cpu
        lens = meta.seq_lens_cpu
        num_seqs = len(lens)
        win, cap = sliding_window or 0, logits_soft_cap or 0.0
        if meta.decode_only:
            return self._decode(
                q, kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale, win, cap
            )

        out = torch.empty_like(q)
        decode_seqs = [b for b in range(num_seqs) if qsl[b + 1] - qsl[b] == 1]
        if len(decode_seqs) > 1:
            rows = torch.tensor([qsl[b] for b in decode_seqs], device=q.device)
            sel = torch.tensor(decode_seqs, device=q.device)
            out[rows] = self._decode(
                q[rows],
                kv_cache,
                meta.block_tables[sel],
                meta.seq_lens[sel],
                max(lens[b] for b in decode_seqs),
                scale,
                win,
                cap,
            )
            done = set(decode_seqs)
        else:
            done = set()
        for b in range(num_seqs):
            if b in done:
                continue
            start, end = qsl[b], qsl[b + 1]
            n, length = end - start, lens[b]
            if n == 0:
                continue
            if n == length:
                # Nothing cached before this chunk: attend over the fresh K/V directly.
                kb, vb = k[start:end], v[start:end]
                first = 0
            else:
                # A window hides every key before the first query's window: skip reading them.
                first = max(0, length - n - win + 1) if win else 0
                first -= first % kv_cache.shape[2]
                kb, vb = gather_kv(kv_cache, meta.block_tables[b], length, first)
            out[start:end] = _attend(q[start:end], kb, vb, length - n - first, scale, win, cap)
        return out

    def _decode(
        self,
        q: Tensor,
        kv_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        max_seq_len: int,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> Tensor:
        """One new token per sequence. CPU float32: the paged C kernel, which reads the cache in
        place (asyncllm.engine.kernels.cpu_decode_attention; padding rows come out as zeros);
        elsewhere, or without a C compiler, the gather + SDPA reference."""
        if self.decode_kernel and cpu_decode_attention.applies(q, kv_cache):
            out = cpu_decode_attention.decode(
                q, kv_cache, block_tables, seq_lens, scale, window, softcap
            )
            if out is not None:
                return out
        return TorchAttentionBackend._decode_torch(
            q, kv_cache, block_tables, seq_lens, max_seq_len, scale, window, softcap
        )

    @staticmethod
    def _decode_torch(
        q: Tensor,
        kv_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        max_seq_len: int,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> Tensor:
        """One new token per sequence: q [B,Hq,D] against padded [B,S] cached K/V (gathered)."""
        block_size = kv_cache.shape[2]
        n = -(-max_seq_len // block_size)
        batch = block_tables.shape[0]
        table = block_tables[:, :n].long()
        if window:
            # Blocks wholly before the window may be freed (any id): read the window's first
            # block in their place; those positions are masked out below anyway.
            j0 = ((seq_lens.long() - window).clamp(min=0) // block_size)[:, None]
            cols = torch.arange(n, device=table.device)[None, :]
            table = torch.where(cols < j0, table.gather(1, j0.clamp(max=n - 1)), table)
        ids = table.reshape(-1)
        blocks = kv_cache.index_select(1, ids).view(2, batch, n * block_size, *kv_cache.shape[3:])
        kv = blocks  # [2, B, S, H, D]
        keys = kv[0].transpose(1, 2)  # [B, H, S, D]
        values = kv[1].transpose(1, 2)
        positions = torch.arange(kv.shape[2], device=q.device)
        lens = seq_lens[:, None].to(positions.dtype)
        mask = positions[None, :] < lens  # [B, S]
        if window:
            mask &= positions[None, :] >= lens - window
        # Padding rows (seq_len 0) would softmax over nothing (NaN); let them see slot 0.
        mask[:, 0] |= seq_lens <= 0
        out = _sdpa(
            q.unsqueeze(2).to(keys.dtype), keys, values, mask[:, None, None, :], scale, softcap
        )
        return out.squeeze(2).to(q.dtype)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offset: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    """Causal attention of n queries at positions offset..offset+n-1 over keys 0..offset+n-1
    (positions relative to the first key given), each seeing at most `window` keys if set."""
    n, length = q.shape[0], k.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    kh = k.transpose(0, 1).unsqueeze(0).to(q.dtype)
    vh = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
    gqa = qh.shape[1] != kh.shape[1]
    if offset == 0 and not window and not softcap:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        # torch's is_causal aligns top-left; the new tokens sit bottom-right of the context.
        rows = torch.arange(n, device=q.device)[:, None] + offset
        cols = torch.arange(length, device=q.device)[None, :]
        mask = cols <= rows
        if window:
            mask &= cols > rows - window
        if gqa and not softcap:
            # The G query heads of a KV head as G * n rows of one head: SDPA then reads each
            # K/V head once instead of expanding it G times (a chunk deep in a long prompt on
            # the CPU: 8 tokens at 7936 of context, 7.1 -> 6.0 ms a layer; 1 token 8.4 -> 4.1).
            hkv, group = kh.shape[1], qh.shape[1] // kh.shape[1]
            qg = qh.reshape(1, hkv, group * n, qh.shape[-1])
            out = _sdpa(qg, kh, vh, mask.repeat(group, 1), scale, softcap)
            # reshape, not view: CUDA's SDPA kernels may return other strides
            return out.reshape(qh.shape).squeeze(0).transpose(0, 1)
        out = _sdpa(qh, kh, vh, mask, scale, softcap)
    return out.squeeze(0).transpose(0, 1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float) -> Tensor:
    """SDPA with a boolean mask (True = attend), or, with a soft cap, the same computed by hand:
    SDPA cannot cap the scores between the product and the softmax. q [..., Hq, n, D]."""
    gqa = q.shape[-3] != k.shape[-3]
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)
