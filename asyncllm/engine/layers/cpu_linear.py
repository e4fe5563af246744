"""oneDNN-prepacked linear layers for float32 inference on the CPU.

torch's plain `F.linear` hands oneDNN/MKL a row-major weight on every call; prepacking the weight
once into oneDNN's blocked layout makes the larger products of a decode step much faster on these
machines (2 cores, batch 64, SmolLM2-135M shapes: gate/up 1.83 -> 1.32 ms, down 1.01 -> 0.79 ms,
the 49152-wide vocabulary projection 71 -> 33 ms; the whole benchmark ~16% faster, the same greedy
tokens). The packed weight replaces the dense one, so memory does not grow, except for a tied
vocabulary projection, whose dense matrix the embedding still needs.

The dense linear method (asyncllm.engine.layers.linear.UnquantizedLinearMethod) packs each
layer's weight once after loading, through `prepack_usable` and `PackedLinear`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _pointwise_available() -> bool:
    """Whether this torch has oneDNN's dense-in/dense-out linear on a packed weight (the op
    inductor's CPU freezing path uses)."""
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


def bucket_rows(m: int) -> int:
    """The row count a linear's input is padded to: exact up to 16, above that rounded up to
    eight steps per power of two (at most 12.5% padding: 17 -> 18, 65 -> 72, 2049 -> 2304).

    oneDNN and ideep each cache a prepared GEMM per distinct input shape (ONEDNN_PRIMITIVE_CACHE_
    CAPACITY and LRU_CACHE_CAPACITY, 1024 entries each, ~0.1-0.3 MiB an entry), and on the CPU
    the number of tokens in a step takes almost any value, so the caches fill to their bound
    and every new count pays a JIT compile. Buckets keep the shapes to ~90 per weight up to
    8192 rows (issue 22 point 11; ops/bench/NOTES.md)."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout. Inputs of any leading shape.

    Where torch has it, `mkldnn._linear_pointwise` on a weight from `_reorder_linear_weight`:
    dense input and output, so no `to_mkldnn()` / `to_dense()` copy of the activations around
    every call (those copies were ~8% of the CPU benchmark: 2 cores, batch 64, SmolLM2-135M,
    per layer 3.10 -> 2.43 ms, vocabulary projection 28 -> 19 ms, the same bits for M > 1).
    Otherwise `mkldnn_linear` on a `to_mkldnn()` weight."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.pointwise = _pointwise_available()
        w = weight.detach()
        if self.pointwise:
            self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
            self.bias_packed = None if bias is None else bias.detach().contiguous()
        else:
            self.weight_packed = w.to_mkldnn()
            self.bias_packed = None if bias is None else bias.detach().to_mkldnn()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # oneDNN refuses empty inputs
            return x.new_empty(*lead, self.out_features)
        m = x2.shape[0]
        padded = bucket_rows(m)
        if padded != m:  # zero rows up to the bucket (fewer cached GEMM shapes); dropped after
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, padded - m))
        if self.pointwise:
            y = torch.ops.mkldnn._linear_pointwise(
                x2.contiguous(), self.weight_packed, self.bias_packed, "none", [], ""
            )
        else:
            y = torch._C._nn.mkldnn_linear(
                x2.contiguous().to_mkldnn(), self.weight_packed, self.bias_packed
            ).to_dense()
        if padded != m:
            y = y[:m]
        return y.view(*lead, self.out_features)


def prepack_usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights on this device in this dtype are prepacked (the dense linear method's
    `process_weights_after_loading`, asyncllm.engine.layers.linear): float32 on the CPU, where
    this torch has oneDNN."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )
