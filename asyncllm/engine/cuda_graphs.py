"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up.

A decode step of a small model is hundreds of tiny kernels; launched eagerly each costs several
microseconds of Python and driver time, inside a graph about one. The graphs read from static
buffers: `run` copies a step's inputs into them (rows past the real batch are padding: slot -1
writes nothing, seq_len 0 reads nothing), replays the smallest bucket that fits, and returns a
view of the graph's output. Prefill and mixed steps stay eager.

API (what the model runner uses):
    runner = CudaGraphRunner(model, kv_caches, max_batch, block_table_width, device)
    runner.capture()                       # once, after the KV cache is allocated
    runner.can_run(meta) -> bool           # decode-only and fits a bucket and the table width
    runner.run(input_ids, positions, meta) -> hidden [B, H]   # valid until the next run
enable_cuda_graphs(model_runner) does all of it from the model runner's configs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from asyncllm.engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (padding wastes at most 7 rows), up to max_batch."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    sizes.append(max_batch)
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        block_table_width: int,
        device: torch.device,
        max_seq_len: int | None = None,
        buckets: list[int] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_batch
        self.width = block_table_width
        self.device = device
        self.max_seq_len = max_seq_len or block_table_width
        self.buckets = sorted(buckets) if buckets else batch_buckets(max_batch)
        # bucket for every batch size 1..max_batch, looked up per step
        self._bucket_of = [0] * (self.buckets[-1] + 1)
        b = 0
        for n in range(1, self.buckets[-1] + 1):
            while self.buckets[b] < n:
                b += 1
            self._bucket_of[n] = self.buckets[b]
        with torch.inference_mode():
            n = self.buckets[-1]
            self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
            self.positions = torch.zeros(n, dtype=torch.long, device=device)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
            self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=device)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=[self.max_seq_len] * n,
            decode_only=True,
        )

    def _forward(self, n: int) -> torch.Tensor:
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._meta(n))

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        mem0 = torch.cuda.mem_get_info()[0]
        # Largest first: smaller graphs then fit in the memory the largest already took.
        for n in reversed(self.buckets):
            self._forward(n)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[n] = self._forward(n)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[n] = g
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.0f MiB",
            len(self.graphs),
            self.buckets[0],
            self.buckets[-1],
            time.perf_counter() - t0,
            (mem0 - torch.cuda.mem_get_info()[0]) / 2**20,
        )

    def can_run(self, meta: AttentionMetadata) -> bool:
        n = meta.seq_lens.shape[0]
        return (
            meta.decode_only
            and 1 <= n <= self.buckets[-1]
            and meta.block_tables.shape[1] <= self.width
            and self._bucket_of[n] in self.graphs
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        bucket = self._bucket_of[n]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables, non_blocking=True)
        if bucket > n:
            self.slot_mapping[n:bucket].fill_(-1)
            self.seq_lens[n:bucket].fill_(0)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]


def enable_cuda_graphs(model_runner: Any) -> CudaGraphRunner:
    """Capture decode graphs for `model_runner` (a ModelRunner whose KV cache is allocated) and
    install them as its `graph_runner`."""
    max_batch = min(model_runner.scheduler_config.max_num_seqs, MAX_GRAPH_BATCH)
    max_len = model_runner.model_config.max_model_len
    width = -(-max_len // model_runner.block_size)
    gr = CudaGraphRunner(
        model_runner.model,
        model_runner.kv_caches,
        max_batch,
        width,
        model_runner.device,
        max_seq_len=max_len,
    )
    gr.capture()
    model_runner.graph_runner = gr
    return gr
