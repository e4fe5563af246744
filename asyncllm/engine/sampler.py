"""Batched sampling on the logits' device.

One call processes the whole batch: per-request parameters become [N] tensors, sparse per-request
token lists (bias, allowed ids, penalties' token histories) become flat index tensors, and every
vocabulary-sized operation runs once over the batch. The only device-to-host transfer is the final
`.tolist()` of one packed tensor.

Processing order (vLLM/OpenAI definitions): allowed_token_ids mask, logit_bias, min_tokens masking,
repetition penalty (prompt + output), frequency/presence penalties (output), temperature, top-k,
top-p, min-p, then sampling by the Gumbel-max trick (greedy rows take the argmax of the processed
logits). Returned logprobs are the raw model log-softmax, before any processing, as vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncllm.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplerRow:
    """One row of logits = one sequence being sampled."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    generator: torch.Generator | None = None  # set when params.seed is set; only this row uses it


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Raw log-softmax of the chosen token and its rank (1 = best) in the raw distribution.
    # Computed only for rows whose params.logprobs is not None; other rows get 0.0 and rank 0,
    # so an all-greedy batch without logprobs stays a bare argmax.
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[tuple[int, float]] | None]  # top-`params.logprobs` (id, logprob)


def _to_device(data: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without a stream sync: a plain `torch.tensor(..., device=cuda)`
    copies from pageable memory and waits for the stream, which would be a second host sync."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _flat_index(
    lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index tensors for a ragged list of per-row token ids."""
    rows: list[int] = []
    cols: list[int] = []
    for r, ids in enumerate(lists):
        rows.extend([r] * len(ids))
        cols.extend(ids)
    return _to_device(rows, torch.long, device), _to_device(cols, torch.long, device)


def _needs_processing(row: SamplerRow) -> bool:
    """Whether this row's logits differ from the raw ones before temperature."""
    p = row.params
    return bool(
        p.allowed_token_ids
        or p.logit_bias
        or _min_tokens_mask_ids(row)
        or p.repetition_penalty != 1.0
        or p.frequency_penalty != 0.0
        or p.presence_penalty != 0.0
    )


def _min_tokens_mask_ids(row: SamplerRow) -> list[int]:
    p = row.params
    if len(row.output_token_ids) >= p.min_tokens:
        return []
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(p._eos_token_ids)
    return ids


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
        n = len(rows)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {n} sampler rows")
        want_lp = [r.params.logprobs is not None for r in rows]
        greedy = [r.params.greedy for r in rows]
        processed = [_needs_processing(r) for r in rows]

        if all(greedy) and not any(processed) and not any(want_lp):
            # The fast path: nothing changes the argmax and nobody asked for logprobs.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [0.0] * n, [0] * n, [None] * n)

        device = logits.device
        raw = logits if logits.dtype == torch.float32 else logits.float()
        x = _process(raw, rows) if any(processed) else raw

        sample_rows = [i for i, g in enumerate(greedy) if not g]
        if not sample_rows:
            tokens = x.argmax(dim=-1)
        elif len(sample_rows) == n:
            tokens = _sample(x, rows)
        else:
            tokens = x.argmax(dim=-1)
            idx = _to_device(sample_rows, torch.long, device)
            sampled = _sample(x.index_select(0, idx), [rows[i] for i in sample_rows])
            tokens = tokens.index_copy(0, idx, sampled)

        if not any(want_lp):
            return SamplerOutput(tokens.tolist(), [0.0] * n, [0] * n, [None] * n)
        return _with_logprobs(raw, tokens, rows, want_lp)


def process_logits(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Everything before temperature (masks, bias, min_tokens, penalties), as a new tensor."""
    processed = [_needs_processing(r) for r in rows]
    return _process(logits.float(), rows) if any(processed) else logits.float().clone()


def _process(raw: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Returns a new tensor: the caller's logits, and the raw ones logprobs need, stay as they are.
    Each step touches only the rows it applies to."""
    device = raw.device
    x = raw.clone()
    params = [r.params for r in rows]

    allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        keep = torch.zeros(len(allowed), x.shape[1], dtype=torch.bool, device=device)
        r, c = _flat_index([params[i].allowed_token_ids or [] for i in allowed], device)
        keep[r, c] = True
        idx = _to_device(allowed, torch.long, device)
        x.index_copy_(0, idx, x.index_select(0, idx).masked_fill_(~keep, _NEG_INF))

    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        rows_: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i in biased:
            for tok, b in (params[i].logit_bias or {}).items():
                rows_.append(i)
                cols.append(tok)
                vals.append(b)
        x.index_put_(
            (_to_device(rows_, torch.long, device), _to_device(cols, torch.long, device)),
            _to_device(vals, x.dtype, device),
            accumulate=True,
        )

    masked = [_min_tokens_mask_ids(r) for r in rows]
    if any(masked):
        r, c = _flat_index(masked, device)
        x[r, c] = _NEG_INF

    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        idx = _to_device(rep, torch.long, device)
        sub = x.index_select(0, idx)
        seen = torch.zeros_like(sub, dtype=torch.bool)
        r, c = _flat_index(
            [rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep], device
        )
        seen[r, c] = True
        pen = _to_device([params[i].repetition_penalty for i in rep], x.dtype, device)[:, None]
        # HF/vLLM: a seen token's positive logit is divided by the penalty, a negative one multiplied.
        sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
        x.index_copy_(0, idx, sub)

    pen_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if pen_rows:
        idx = _to_device(pen_rows, torch.long, device)
        sub = x.index_select(0, idx)
        counts = torch.zeros_like(sub)
        r, c = _flat_index([rows[i].output_token_ids for i in pen_rows], device)
        counts.index_put_((r, c), torch.ones_like(c, dtype=sub.dtype), accumulate=True)
        freq = _to_device([params[i].frequency_penalty for i in pen_rows], x.dtype, device)
        pres = _to_device([params[i].presence_penalty for i in pen_rows], x.dtype, device)
        # OpenAI: logit -= frequency * count + presence * (count > 0), over output tokens only.
        sub = sub - freq[:, None] * counts - pres[:, None] * (counts > 0).to(sub.dtype)
        x.index_copy_(0, idx, sub)
    return x


def _sample(x: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p and a Gumbel-max draw for rows that all sample."""
    device = x.device
    params = [r.params for r in rows]
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x = x / _to_device(temps, x.dtype, device)[:, None]

    top_k = [p.top_k if 0 < p.top_k < x.shape[1] else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        x = _top_k_top_p(x, top_k, top_p)
    elif any(top_k):
        x = _top_k(x, top_k)

    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
        mp = _to_device(min_p, x.dtype, device)
        limit = x.max(dim=-1, keepdim=True).values + torch.log(mp)[:, None]
        x = x.masked_fill(x < limit, _NEG_INF)

    u = torch.empty_like(x)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if len(seeded) < len(rows):
        u.uniform_()
    # A loop over the seeded rows only: each draws its noise from its own generator, so a seeded
    # request's tokens do not depend on what else is in the batch.
    for i in seeded:
        u[i].uniform_(generator=rows[i].generator)
    # Gumbel-max: argmax(logits + G) with G = -log(-log(U)) is a draw from softmax(logits).
    # U in [0, 1): U = 0 gives G = -inf (the token just loses); U never reaches 1, so G is finite.
    g = u.log_().neg_().log_().neg_()
    return (x + g).argmax(dim=-1)


def _top_k(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    k_max = max(top_k)
    vals = torch.topk(x, k_max, dim=-1).values
    k = _to_device([max(k, 1) - 1 for k in top_k], torch.long, x.device)
    kth = vals.gather(1, k[:, None])
    off = _to_device([k == 0 for k in top_k], torch.bool, x.device)[:, None]
    kth = kth.masked_fill(off, _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """One ascending sort serves both: top-k keeps values >= the k-th largest; top-p then drops
    every token whose larger tokens already hold at least top_p of the (top-k) probability."""
    device = x.device
    vocab = x.shape[1]
    srt, order = x.sort(dim=-1)
    if any(top_k):
        k = _to_device([vocab - k if k else 0 for k in top_k], torch.long, device)
        kth = srt.gather(1, k[:, None])
        srt = srt.masked_fill(srt < kth, _NEG_INF)
    probs = srt.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    p = _to_device(top_p, x.dtype, device)
    drop = cum <= (1.0 - p)[:, None]
    drop[:, -1] = False  # the most likely token always stays
    srt = srt.masked_fill(drop, _NEG_INF)
    return torch.empty_like(x).scatter_(1, order, srt)


def _with_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerRow], want: list[bool]
) -> SamplerOutput:
    n = len(rows)
    lp = raw.log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])
    ranks = (lp > chosen).sum(dim=-1) + 1
    ks = [r.params.logprobs or 0 for r in rows]
    k_max = min(max(ks), raw.shape[1])
    parts = [tokens.double(), chosen[:, 0].double(), ranks.double()]
    if k_max:
        top = lp.topk(k_max, dim=-1)
        parts += [top.indices.double().flatten(), top.values.double().flatten()]
    # The one host sync of the step: everything packed into one tensor.
    flat = torch.cat(parts).tolist()
    tok_ids = [int(t) for t in flat[:n]]
    chosen_lp = flat[n : 2 * n]
    rank_l = [int(r) for r in flat[2 * n : 3 * n]]
    top_ids = flat[3 * n : 3 * n + n * k_max]
    top_vals = flat[3 * n + n * k_max :]
    top_out: list[list[tuple[int, float]] | None] = []
    for i in range(n):
        if not want[i]:
            top_out.append(None)
            chosen_lp[i], rank_l[i] = 0.0, 0
            continue
        a = i * k_max
        top_out.append([(int(top_ids[a + j]), top_vals[a + j]) for j in range(min(ks[i], k_max))])
    return SamplerOutput(tok_ids, chosen_lp, rank_l, top_out)


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: list[int], k: int
) -> list[dict[int, tuple[float, int]]]:
    """For each row of `logits` (the distribution over the next prompt token): the target token's
    raw logprob and rank (1 = best), plus the top-k tokens' logprobs and ranks."""
    m = logits.shape[0]
    if len(target_ids) != m:
        raise ValueError(f"{len(target_ids)} target ids for {m} rows of logits")
    if m == 0:
        return []
    lp = logits.float().log_softmax(dim=-1)
    tgt = _to_device(target_ids, torch.long, lp.device)
    chosen = lp.gather(1, tgt[:, None])
    ranks = (lp > chosen).sum(dim=-1) + 1
    k = min(k, lp.shape[1])
    parts = [chosen[:, 0].double(), ranks.double()]
    if k:
        top = lp.topk(k, dim=-1)
        parts += [top.indices.double().flatten(), top.values.double().flatten()]
    flat = torch.cat(parts).tolist()
    out: list[dict[int, tuple[float, int]]] = []
    for i in range(m):
        d: dict[int, tuple[float, int]] = {}
        for j in range(k):
            d[int(flat[2 * m + i * k + j])] = (flat[2 * m + m * k + i * k + j], j + 1)
        d[target_ids[i]] = (flat[i], int(flat[m + i]))
        out.append(d)
    return out
