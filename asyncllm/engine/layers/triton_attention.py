"""The `triton` attention backend: paged attention straight from the block table on the GPU.

Contract (docs/INTERFACES.md, Attention): write this step's K/V into the cache first, then every
query token attends causally to its sequence's context. Decode-only batches take the GQA-aware
split-context decode kernel (the only path inside CUDA graphs: it reads no host-side lengths);
anything else takes the varlen prefill kernel over a host-built tile list.

`decode` / `prefill` pick the kernel of each kind (kernel_paths reads them from
ASYNCLLM_DECODE_ATTENTION / ASYNCLLM_PREFILL_ATTENTION): "triton" (decode: the balanced plan),
"triton-v1" (decode: the first round's equal cut) or "fa4" (FlashAttention-4's paged kernels,
asyncllm.engine.kernels.fa4_attention; a layer with a sliding window or a soft cap stays on
Triton). FA4 decode is CUDA-graph safe after the warm-up call the graph runner makes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from asyncllm.engine.kernels.cache_write import write_kv_cache
from asyncllm.engine.kernels.decode_attention import paged_decode_attention
from asyncllm.engine.kernels.prefill_attention import (
    build_prefill_work,
    paged_prefill_attention,
    prefill_block_m,
)
from asyncllm.engine.layers.attention import AttentionBackend

if TYPE_CHECKING:
    from asyncllm.engine.layers.attention import AttentionMetadata

_WORK_ATTR = "_triton_prefill_work"
DECODE_KERNELS = ("triton", "triton-v1", "fa4")
PREFILL_KERNELS = ("triton", "fa4")


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(
        self,
        device: torch.device | str | None = None,
        decode: str = "triton",
        prefill: str = "triton",
    ):
        if decode not in DECODE_KERNELS:
            raise ValueError(f"decode attention kernel must be one of {DECODE_KERNELS}: {decode!r}")
        if prefill not in PREFILL_KERNELS:
            raise ValueError(
                f"prefill attention kernel must be one of {PREFILL_KERNELS}: {prefill!r}"
            )
        self.device = torch.device(device) if device is not None else None
        self.decode = decode
        self.prefill = prefill
        self._fa4 = None
        if "fa4" in (decode, prefill):
            from asyncllm.engine.kernels import fa4_attention

            self._fa4 = fa4_attention
        if decode != "triton" or prefill != "triton":
            self.name = f"triton(decode={decode}, prefill={prefill})"

    def _prefill_work(
        self, meta: AttentionMetadata, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        # Built once per step and shared by every layer: the metadata object is per step.
        cached = getattr(meta, _WORK_ATTR, None)
        if cached is not None:
            return cached
        block_m = prefill_block_m(meta.max_query_len)
        work = build_prefill_work(meta.query_start_loc_cpu, block_m)
        pin = device.type == "cuda"
        t = torch.tensor(work, dtype=torch.int32, pin_memory=pin).view(-1, 2)
        t = t.to(device, non_blocking=pin)
        cached = (t, block_m)
        setattr(meta, _WORK_ATTR, cached)
        return cached

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        fa4 = self._fa4 is not None and self._fa4.supports(
            q.shape[-1], sliding_window, logits_soft_cap
        )
        if meta.decode_only:
            if fa4 and self.decode == "fa4":
                return self._fa4.decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale)
            return paged_decode_attention(
                q,
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap,
                balanced=self.decode != "triton-v1",
            )
        if fa4 and self.prefill == "fa4":
            return self._fa4.prefill(
                q,
                kv_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                meta.max_query_len,
                scale,
            )
        work, block_m = self._prefill_work(meta, q.device)
        return paged_prefill_attention(
            q,
            kv_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            work,
            block_m,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )

    __call__ = forward
