"""4-bit weight layouts of GPTQ and AutoAWQ checkpoints: pack, unpack, dequantize (the float32
references), and a round-to-nearest quantizer producing either (tests and the benchmark pack
their own checkpoints with it).

GPTQ (AutoGPTQ / gptqmodel, `checkpoint_format` "gptq"): `qweight` int32 [in/8, out], 8 inputs
per word along the input dim, input 8r+j in bits 4j..4j+3 of row r; `qzeros` int32
[groups, out/8], 8 outputs per word along the output dim in natural order, each stored as
zero - 1 (the "v1" quirk; "gptq_v2" stores the zero itself); `scales` fp16 [groups, out];
`g_idx` int32 [in], the group of each input (i // group_size, or a permutation with desc_act).
w[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).

AWQ GEMM (AutoAWQ `version: "gemm"`): `qweight` int32 [in, out/8] packed along the output dim
with the 8 outputs of a word in the order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds output
8c + AWQ_ORDER[i]); `qzeros` int32 [groups, out/8] the same way (zeros as they are); `scales`
fp16 [groups, out]; groups are consecutive inputs. w[i, o] = scales[g, o] * (q[i, o] - z[g, o]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _to_int32(words: Tensor) -> Tensor:
    """int64 words holding 32 bits -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: Tensor) -> Tensor:
    """int [K, N] (values 0..15) -> int32 [K/8, N]: 8 consecutive rows per word."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"{k} rows do not pack by 8")
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    return _to_int32((q << _SHIFTS.to(q.device, torch.int64).view(1, 8, 1)).sum(1))


def unpack_rows(packed: Tensor) -> Tensor:
    """int32 [K/8, N] -> int32 [K, N]."""
    shifts = _SHIFTS.to(packed.device).view(1, 8, 1)
    return ((packed.unsqueeze(1) >> shifts) & 0xF).reshape(-1, packed.shape[1])


def pack_cols(q: Tensor, order: tuple[int, ...] = tuple(range(8))) -> Tensor:
    """int [K, N] -> int32 [K, N/8]: nibble i of word c holds column 8c + order[i]."""
    k, n = q.shape
    if n % 8:
        raise ValueError(f"{n} columns do not pack by 8")
    q = q.to(torch.int64).reshape(k, n // 8, 8)[:, :, list(order)]
    return _to_int32((q << _SHIFTS.to(q.device, torch.int64).view(1, 1, 8)).sum(2))


def unpack_cols(packed: Tensor, order: tuple[int, ...] = tuple(range(8))) -> Tensor:
    """int32 [K, N/8] -> int32 [K, N], undoing `pack_cols` with the same order."""
    shifts = _SHIFTS.to(packed.device).view(1, 1, 8)
    nib = (packed.unsqueeze(2) >> shifts) & 0xF  # [K, N/8, 8]: nibble i
    inverse = [order.index(j) for j in range(8)]  # column j sits in nibble order.index(j)
    return nib[:, :, inverse].reshape(packed.shape[0], -1)


@dataclass
class Int4Weights:
    """Unpacked 4-bit weights of one linear layer, input-major as both formats think of it."""

    q: Tensor  # int32 [K, N], 0..15
    scales: Tensor  # [G, N]
    zeros: Tensor  # int32 [G, N], the real zero points (GPTQ v1 can reach 16)
    g_idx: Tensor  # int32 [K]

    def dequantize(self) -> Tensor:
        """float32 [N, K], transformers' [out, in] layout."""
        g = self.g_idx.long()
        w = (self.q - self.zeros[g]).float() * self.scales[g].float()
        return w.t().contiguous()


def quantize_int4(
    weight: Tensor,
    group_size: int,
    *,
    sym: bool = False,
    desc_act: bool = False,
    order: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Int4Weights:
    """Round-to-nearest 4-bit quantization of a float [out, in] weight per group of inputs.
    desc_act: the groups gather a permutation of the inputs (as GPTQ's activation order makes
    them): `order`, or a random one; projections sharing an input share it in real checkpoints. sym: GPTQ's symmetric grid (zero 8); else min/max with an integer zero."""
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"in features {k} are not a multiple of the group size {gs}")
    groups = k // gs
    if order is None:
        order = torch.randperm(k, generator=generator) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    w = weight.detach().float().t()  # [K, N]
    wg = w[order].reshape(groups, gs, n)
    if sym:
        amax = wg.abs().amax(1).clamp_min(1e-8)
        scales = (2 * amax / 15).to(torch.float16)
        zeros = torch.full((groups, n), 8, dtype=torch.int32)
    else:
        lo, hi = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)
        scales = ((hi - lo).clamp_min(1e-8) / 15).to(torch.float16)
        zeros = torch.round(-lo / scales.float()).clamp(0, 15).to(torch.int32)
    g = g_idx.long()
    q = torch.round(w / scales[g].float()) + zeros[g]
    return Int4Weights(q.clamp(0, 15).to(torch.int32), scales, zeros, g_idx)


# ---- the two checkpoint layouts ---------------------------------------------------------------
def to_gptq(w: Int4Weights, v1: bool = True) -> dict[str, Tensor]:
    """The tensors a GPTQ checkpoint stores for one layer (v1: zeros minus one)."""
    zeros = (w.zeros - 1) & 0xF if v1 else w.zeros
    return {
        "qweight": pack_rows(w.q),
        "qzeros": pack_cols(zeros),
        "scales": w.scales.to(torch.float16),
        "g_idx": w.g_idx.to(torch.int32),
    }


def from_gptq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, v1: bool = True
) -> Int4Weights:
    zeros = unpack_cols(qzeros)
    if v1:
        zeros = zeros + 1
    return Int4Weights(unpack_rows(qweight), scales, zeros, g_idx.to(torch.int32))


def to_awq(w: Int4Weights) -> dict[str, Tensor]:
    """The tensors an AutoAWQ GEMM checkpoint stores for one layer (consecutive groups only)."""
    k = w.q.shape[0]
    gs = k // w.scales.shape[0]
    if not torch.equal(w.g_idx.long(), torch.arange(k) // gs):
        raise ValueError("AWQ groups are consecutive inputs: no activation order")
    return {
        "qweight": pack_cols(w.q, AWQ_ORDER),
        "qzeros": pack_cols(w.zeros, AWQ_ORDER),
        "scales": w.scales.to(torch.float16),
    }


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Int4Weights:
    k = qweight.shape[0]
    groups = scales.shape[0]
    if k % groups:
        raise ValueError(f"{k} inputs do not split into {groups} groups")
    g_idx = (torch.arange(k, device=qweight.device) // (k // groups)).to(torch.int32)
    return Int4Weights(
        unpack_cols(qweight, AWQ_ORDER), scales, unpack_cols(qzeros, AWQ_ORDER), g_idx
    )
