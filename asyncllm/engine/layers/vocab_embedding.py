"""The token embedding and the vocabulary projection (logits head), the vocabulary split across
tensor-parallel ranks (one rank today: the whole vocabulary).

Each rank holds a contiguous range of ceil(vocab / tp_size) rows (the last range zero-padded).
The embedding looks up the ids in its range and the ranks' lookups are summed; the head computes
its range's logits and the ranks' ranges are gathered. A tied head has no weight of its own: it
reads the embedding's, and its linear method (on the CPU in float32: a oneDNN-prepacked copy)
is set up after loading like every other linear layer's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asyncllm.engine import distributed
from asyncllm.engine.layers.linear import QuantizationConfig, method_for, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
        tp_rank: int | None = None,
        tp_size: int | None = None,
        _create: bool = True,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.prefix = prefix
        self.tp_rank = distributed.get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = distributed.get_tp_size() if tp_size is None else tp_size
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        if _create:
            self._create_weight()

    def _create_weight(self) -> None:
        weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition, self.embedding_dim, dtype=self.params_dtype
            ),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0, "weight_loader": self.weight_loader})
        self.register_parameter("weight", weight)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{self.prefix} has no shards (got shard id {shard_id!r})")
        want = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded.shape) != want:
            raise ValueError(
                f"checkpoint tensor for {self.prefix} has shape {tuple(loaded.shape)}, "
                f"expected {want}"
            )
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = (input_ids - self.vocab_start) * mine
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return distributed.tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, H] -> logits [N, vocab]. `tie_to`: an embedding whose weight this head reads
    (tied word embeddings); then the head has no parameter of its own."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tie_to: VocabParallelEmbedding | None = None,
    ):
        super().__init__(
            num_embeddings, embedding_dim, params_dtype, prefix, tp_rank, tp_size, _create=False
        )
        # A tuple, not a submodule: the embedding's weight is listed (and loaded) once.
        self._tied: tuple[VocabParallelEmbedding, ...] = () if tie_to is None else (tie_to,)
        # A tied head reads a dense embedding: it is never quantized.
        self.linear_method = method_for(self, None if tie_to else quant_config, prefix)
        self._create_weight()
        if bias:
            b = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition, dtype=self.params_dtype),
                requires_grad=False,
            )
            set_weight_attrs(b, {"output_dim": 0, "weight_loader": self.weight_loader_1d})
            self.register_parameter("bias", b)
        else:
            self.register_parameter("bias", None)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def _create_weight(self) -> None:
        if self._tied:
            return
        from asyncllm.engine.layers.linear import UnquantizedLinearMethod

        if isinstance(self.linear_method, UnquantizedLinearMethod):
            super()._create_weight()  # the embedding's layout and its padded loader
        else:
            self.linear_method.create_weights(
                self,
                self.embedding_dim,
                [self.num_embeddings_per_partition],
                self.embedding_dim,
                self.num_embeddings,
                self.params_dtype,
            )

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            tied = self.__dict__.get("_tied")
            if tied:
                return tied[0].weight
        return super().__getattr__(name)

    def weight_loader_1d(self, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def packed_bias(self) -> Tensor | None:
        return self.bias

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, hidden: Tensor) -> Tensor:  # type: ignore[override]
        logits = self.linear_method.apply(self, hidden, self.bias)
        if self.tp_size > 1:
            logits = distributed.tensor_model_parallel_all_gather(logits, dim=-1)
            logits = logits[..., : self.num_embeddings]  # the last range's padding
        return logits
