"""One-pass sampling at temperature: the Gumbel-max draw fused with temperature and min-p.

`argmax_v(x_v / T + G_v)` with G_v i.i.d. Gumbel(0, 1) is an exact draw from softmax(x / T) (the
exponential race: `argmax(p_v / E_v)` with E_v ~ Exp(1) is the same thing in probability space).
Written as `argmax(x + T * G)` (the same argmax for T > 0), a greedy row is `T = 0`: no noise, a
plain argmax whose ties go to the smallest index, as torch's argmax. The kernel reads the logits
once, in their own dtype, and writes one (value, index) pair per row and vocabulary split; the
splits are reduced by torch. What it replaces in the sampler: the float cast, the division by T,
max, subtraction, exp, the full-vocabulary cumsum (a scan: ~194 us per step at 48 rows on an H200)
and searchsorted.

Randomness: the noise of (row, token v) is Philox(seed_row, v), so a row's draw depends only on its
own seed (the sampler takes it from the row's torch.Generator when the request is seeded) and not
on the batch or the split layout. The uniform u in [0, 1) becomes E = -log(1 - u) through a series
below 1e-3, so the small E that decide the race keep their precision (float32 `1 - u` would round
them to 0), and u is offset by half a step so that E is never 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
# Programs to aim for: a few per SM of an H100/H200, so a small batch still spreads its rows'
# vocabulary over the whole GPU.
_TARGET_PROGRAMS = 1024


@triton.jit
def _gumbel_argmax_kernel(
    x_ptr,
    stride_x,
    temp_ptr,
    floor_ptr,
    seed_ptr,
    val_ptr,
    idx_ptr,
    vocab,
    chunk,
    n_splits,
    HAS_FLOOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    floor = float("-inf")
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + row)
    start = split * chunk
    lanes = tl.arange(0, BLOCK)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    base = x_ptr + row.to(tl.int64) * stride_x
    for i in range(0, chunk, BLOCK):
        cols = start + i + lanes
        mask = (cols < vocab) & (i + lanes < chunk)
        x = tl.load(base + cols, mask=mask, other=float("-inf"))
        x = x.to(tl.float32)  # bf16 arithmetic is wrong in the interpreter; float32 anyway
        u = tl.rand(seed, cols) + 2.3283064e-10  # + 2**-32: half a step of tl.rand's grid
        e = tl.where(u < 1e-3, u * (1.0 + u * (0.5 + u * 0.33333334)), -tl.log(1.0 - u))
        g = -tl.log(e)
        score = tl.where(t > 0, x + t * g, x)
        keep = mask & (x >= floor) & (x > float("-inf"))
        score = tl.where(keep, score, float("-inf"))
        better = score > best_val  # strict: a lane keeps its earliest index on a tie
        best_val = tl.where(better, score, best_val)
        best_idx = tl.where(better, cols, best_idx)
    m = tl.max(best_val, axis=0)
    # The smallest index among the lanes holding the maximum: torch.argmax's tie rule.
    j = tl.min(tl.where(best_val == m, best_idx, 2147483647), axis=0)
    tl.store(val_ptr + row * n_splits + split, m)
    tl.store(idx_ptr + row * n_splits + split, j)


def gumbel_argmax(
    x: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """One draw per row of `x` [N, V] (any float dtype) from softmax(x / T) over the tokens with
    `x >= floor` (min-p; -inf keeps all), or its argmax where T = 0. `temperature` float32 [N],
    `seeds` int64 [N], `floor` float32 [N] or None. Returns int64 [N] on x's device. A row whose
    logits are all -inf returns an index >= V (the caller's rows never are: EOS is never masked
    with every other token)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, V], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n, vocab = x.shape
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    cdiv = triton.cdiv
    n_splits = max(1, min(cdiv(_TARGET_PROGRAMS, n), cdiv(vocab, BLOCK)))
    chunk = cdiv(cdiv(vocab, n_splits), BLOCK) * BLOCK
    n_splits = cdiv(vocab, chunk)
    vals = torch.empty(n, n_splits, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, n_splits, dtype=torch.int32, device=x.device)
    _gumbel_argmax_kernel[(n, n_splits)](
        x,
        x.stride(0),
        temperature,
        floor if floor is not None else temperature,
        seeds,
        vals,
        idx,
        vocab,
        chunk,
        n_splits,
        HAS_FLOOR=floor is not None,
        BLOCK=BLOCK,
    )
    if n_splits == 1:
        return idx[:, 0].long()
    # The first split holding the maximum: the smallest index again.
    return idx.gather(1, vals.argmax(dim=1, keepdim=True))[:, 0].long()
