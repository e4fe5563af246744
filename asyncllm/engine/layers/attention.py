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
    """Writes the new K/V into the paged cache, then attends causally within each sequence."""

    name: str = "base"

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
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


def gather_kv(kv_cache: Tensor, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The first `length` cached K and V of one sequence: [length, Hkv, D] each."""
    block_size = kv_cache.shape[2]
    n = -(-length // block_size)
    # index_select: several times faster than advanced indexing behind a leading slice.
    blocks = kv_cache.index_select(1, block_table[:n].long())  # [2, n, bs, H, D]
    blocks = blocks.flatten(1, 2)[:, :length]
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
    ) -> Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, self.fused_ops)
        qsl = meta.query_start_loc_cpu
        lens = meta.seq_lens_cpu
        num_seqs = len(lens)
        if meta.decode_only:
            return self._decode(
                q, kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
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
            else:
                kb, vb = gather_kv(kv_cache, meta.block_tables[b], length)
            out[start:end] = _attend(q[start:end], kb, vb, length - n, scale)
        return out

    def _decode(
        self,
        q: Tensor,
        kv_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        max_seq_len: int,
        scale: float,
    ) -> Tensor:
        """One new token per sequence. CPU float32: the paged C kernel, which reads the cache in
        place (asyncllm.engine.kernels.cpu_decode_attention; padding rows come out as zeros);
        elsewhere, or without a C compiler, the gather + SDPA reference."""
        if self.decode_kernel and cpu_decode_attention.applies(q, kv_cache):
            out = cpu_decode_attention.decode(q, kv_cache, block_tables, seq_lens, scale)
            if out is not None:
                return out
        return TorchAttentionBackend._decode_torch(
            q, kv_cache, block_tables, seq_lens, max_seq_len, scale
        )

    @staticmethod
    def _decode_torch(
        q: Tensor,
        kv_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        max_seq_len: int,
        scale: float,
    ) -> Tensor:
        """One new token per sequence: q [B,Hq,D] against padded [B,S] cached K/V (gathered)."""
        block_size = kv_cache.shape[2]
        n = -(-max_seq_len // block_size)
        batch = block_tables.shape[0]
        ids = block_tables[:, :n].reshape(-1).long()
        blocks = kv_cache.index_select(1, ids).view(2, batch, n * block_size, *kv_cache.shape[3:])
        kv = blocks  # [2, B, S, H, D]
        keys = kv[0].transpose(1, 2)  # [B, H, S, D]
        values = kv[1].transpose(1, 2)
        positions = torch.arange(kv.shape[2], device=q.device)
        mask = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [B, S]
        # Padding rows (seq_len 0) would softmax over nothing (NaN); let them see slot 0.
        mask[:, 0] = True
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(keys.dtype),  # [B, Hq, 1, D]
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return out.squeeze(2).to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, offset: int, scale: float) -> Tensor:
    """Causal attention of n queries at positions offset..offset+n-1 over keys 0..offset+n-1."""
    n, length = q.shape[0], k.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    kh = k.transpose(0, 1).unsqueeze(0).to(q.dtype)
    vh = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
    gqa = qh.shape[1] != kh.shape[1]
    if offset == 0:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        # torch's is_causal aligns top-left; the new tokens sit bottom-right of the context.
        rows = torch.arange(n, device=q.device)[:, None] + offset
        mask = torch.arange(length, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return out.squeeze(0).transpose(0, 1)
