"""Batched sampling on the logits' device.

One call processes the whole batch: per-request parameters become [N] tensors, sparse per-request
token lists (bias, allowed ids, penalties' token histories) become flat index tensors, and every
vocabulary-sized operation runs once over the batch. The only device-to-host transfer is the final
`.tolist()` of one packed tensor.

Processing order (vLLM/OpenAI definitions): allowed_token_ids mask, logit_bias, min_tokens masking,
repetition penalty (prompt + output), frequency/presence penalties (output), temperature, min-p,
top-k, top-p (top-p's mass is counted over the tokens min-p and top-k left, as vLLM's sampler
does: min-p is one of its argmax-invariant logits processors, run before top-k/top-p), then one
inverse-CDF draw per row from a single uniform (greedy rows take the argmax of the processed
logits). Returned logprobs are the raw model log-softmax, before any processing,
as vLLM's default.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from asyncllm.engine.grammar import StepBitmask, apply_bitmask
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


class PendingSample:
    """A batch's sampling, launched on the device. `tokens` (int64 [N], on the logits' device)
    can feed the next step's input ids before any host sync; `result()` is the host sync."""

    def __init__(
        self,
        tokens: torch.Tensor,
        packed: torch.Tensor,
        decode: Callable[[list], SamplerOutput],
    ):
        self.tokens = tokens
        self._decode = decode
        self._event = None
        if packed.device.type == "cuda":
            # Copy into pinned memory now, without waiting; result() waits for this copy only.
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            packed = host
        self._packed = packed
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            self._result = self._decode(self._packed.tolist())
        return self._result


def needs_history(params: SamplingParams) -> bool:
    """Whether sampling this request reads its generated tokens (penalties, min_tokens)."""
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
        or params.min_tokens > 0
    )


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
    # EOS is held back too under ignore_eos (vLLM masks every stop id during min_tokens): the
    # request asked for at least min_tokens real tokens, EOS would be one that ends nothing.
    return list(p.stop_token_ids or []) + list(p._eos_token_ids)


def _fused_default(device: torch.device) -> bool:
    """The fused Gumbel-max kernel where it helps: CUDA with triton (ASYNCLLM_SAMPLER_FUSED=0
    keeps the inverse-CDF draw). On the CPU the vocabulary of noise costs more than the scan."""
    from asyncllm import envs

    if device.type != "cuda" or not envs.sampler_fused():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class Sampler:
    def __init__(self, fused: bool | None = None):
        """`fused`: draw temperature rows (no top-k/top-p) with the one-pass Gumbel-max kernel
        (kernels/sampling.py). None: on CUDA unless ASYNCLLM_SAMPLER_FUSED=0 (read here, once);
        True forces it (the interpreter tests)."""
        self._fused = fused

    def _use_fused(self, device: torch.device) -> bool:
        if self._fused is None:
            self._fused = _fused_default(device)
        return self._fused

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplerRow],
        bitmask: StepBitmask | None = None,
    ) -> SamplerOutput:
        return self.launch(logits, rows, bitmask).result()

    def launch(
        self,
        logits: torch.Tensor,
        rows: list[SamplerRow],
        bitmask: StepBitmask | None = None,
    ) -> PendingSample:
        """`bitmask` (grammar rows) is applied to `logits` in place before anything else, so the
        raw logprobs are those of the constrained distribution, as in vLLM."""
        n = len(rows)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {n} sampler rows")
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        want_lp = [r.params.logprobs is not None for r in rows]
        greedy = [r.params.greedy for r in rows]
        processed = [_needs_processing(r) for r in rows]

        if all(greedy) and not any(processed) and not any(want_lp):
            # The fast path: nothing changes the argmax and nobody asked for logprobs.
            return _tokens_only(logits.argmax(dim=-1), n)

        device = logits.device
        if self._use_fused(device):
            return self._launch_fused(logits, rows, want_lp, greedy, processed)
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
            return _tokens_only(tokens, n)
        return _with_logprobs(raw, tokens, rows, want_lp)

    def _launch_fused(
        self,
        logits: torch.Tensor,
        rows: list[SamplerRow],
        want_lp: list[bool],
        greedy: list[bool],
        processed: list[bool],
    ) -> PendingSample:
        """Every row in one Gumbel-max pass over the logits in their own dtype (greedy rows at
        T = 0: a plain argmax); rows with top-k/top-p are then redrawn by the sorting path."""
        from asyncllm.engine.kernels.sampling import gumbel_argmax

        n = len(rows)
        device = logits.device
        raw = None
        if any(want_lp) or any(processed):
            raw = logits if logits.dtype == torch.float32 else logits.float()
        x = _process(raw, rows) if any(processed) and raw is not None else logits
        vocab = x.shape[1]
        trunc = [
            i
            for i, r in enumerate(rows)
            if not greedy[i] and (0 < r.params.top_k < vocab or r.params.top_p < 1.0)
        ]
        in_trunc = set(trunc)
        race = [i for i in range(n) if not greedy[i] and i not in in_trunc]
        if len(trunc) == n:
            tokens = _sample(x if x.dtype == torch.float32 else x.float(), rows)
        else:
            temps = [
                0.0 if greedy[i] or i in in_trunc else rows[i].params.temperature for i in range(n)
            ]
            tokens = gumbel_argmax(
                x,
                _to_device(temps, torch.float32, device),
                _race_seeds(rows, race, device),
                _race_floor(x, rows, race, temps),
            )
            if trunc:
                idx = _to_device(trunc, torch.long, device)
                sub = x.index_select(0, idx)
                sampled = _sample(
                    sub if sub.dtype == torch.float32 else sub.float(), [rows[i] for i in trunc]
                )
                tokens = tokens.index_copy(0, idx, sampled)
        if not any(want_lp):
            return _tokens_only(tokens, n)
        assert raw is not None
        return _with_logprobs(raw, tokens, rows, want_lp)


def _race_seeds(rows: list[SamplerRow], race: list[int], device: torch.device) -> torch.Tensor:
    """One Philox seed per row for the Gumbel-max kernel: a seeded row's comes from its own
    generator (one draw per step, so its tokens do not depend on the batch), the others' from
    the global one."""
    seeds = torch.randint(0, 2**62, (len(rows),), device=device)
    seeded = [i for i in race if rows[i].generator is not None]
    if seeded:
        draws = [
            torch.randint(0, 2**62, (1,), generator=rows[i].generator, device=device)
            for i in seeded
        ]
        seeds.index_copy_(0, _to_device(seeded, torch.long, device), torch.cat(draws))
    return seeds


def _race_floor(
    x: torch.Tensor, rows: list[SamplerRow], race: list[int], temps: list[float]
) -> torch.Tensor | None:
    """min-p as a floor on the unscaled logits: p_v < min_p * p_max <=> x_v < max + T log(min_p)
    (-inf for the rows without min-p); None when no racing row has min-p."""
    offs = [_NEG_INF] * len(rows)
    for i in race:
        m = rows[i].params.min_p
        if m > 0.0:
            offs[i] = temps[i] * math.log(m)
    if all(o == _NEG_INF for o in offs):
        return None
    top = x.max(dim=-1).values.float()
    return top + _to_device(offs, torch.float32, x.device)


def _tokens_only(tokens: torch.Tensor, n: int) -> PendingSample:
    def decode(ids: list) -> SamplerOutput:
        return SamplerOutput(ids, [0.0] * n, [0] * n, [None] * n)

    return PendingSample(tokens, tokens, decode)


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

    # Penalties touch only the tokens a row has seen: gather them, change them, scatter them back.
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        r, c = _flat_index(
            [rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep], device
        )
        batch_rows = _to_device(rep, torch.long, device)[r]
        pen = _to_device([params[i].repetition_penalty for i in rep], x.dtype, device)[r]
        v = x[batch_rows, c]
        # HF/vLLM: a seen token's positive logit is divided by the penalty, a negative one
        # multiplied. A token seen twice is written twice with the same value.
        x[batch_rows, c] = torch.where(v > 0, v / pen, v * pen)

    pen_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if pen_rows:
        rows_: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i in pen_rows:
            p = params[i]
            for tok, count in Counter(rows[i].output_token_ids).items():
                rows_.append(i)
                cols.append(tok)
                # OpenAI: logit -= frequency * count + presence * (count > 0), output tokens only.
                vals.append(-(p.frequency_penalty * count + p.presence_penalty))
        if rows_:
            x.index_put_(
                (_to_device(rows_, torch.long, device), _to_device(cols, torch.long, device)),
                _to_device(vals, x.dtype, device),
                accumulate=True,
            )
    return x


# On the CPU a full sort of the vocabulary costs more than the rest of the step; the nucleus nearly
# always lies among the few hundred best tokens, so top-k/top-p rows first take that many
# candidates (exactly: a row whose candidates hold less than its top_p is redone with the full
# sort). On a GPU the sort is cheap and that data-dependent check would cost a host sync.
_CPU_CANDIDATES = 256


def _sample(x: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p and one inverse-CDF draw per row, for rows that sample."""
    device = x.device
    n, vocab = x.shape
    params = [r.params for r in rows]
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x = x / _to_device(temps, x.dtype, device)[:, None]
    u = _uniforms(rows, device)
    trunc = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if len(trunc) == n:
        return _sample_truncated(x, params, u)
    if not trunc:
        return _sample_full(x, params, u)
    in_trunc = set(trunc)
    plain = [i for i in range(n) if i not in in_trunc]
    tokens = torch.empty(n, dtype=torch.long, device=device)
    for group, fn in ((trunc, _sample_truncated), (plain, _sample_full)):
        idx = _to_device(group, torch.long, device)
        sub = fn(x.index_select(0, idx), [params[i] for i in group], u.index_select(0, idx))
        tokens.index_copy_(0, idx, sub)
    return tokens


def _uniforms(rows: list[SamplerRow], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row: the whole randomness of a row's draw."""
    u = torch.rand(len(rows), device=device)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if seeded:
        # A loop over the seeded rows only: each draws from its own generator, so a seeded
        # request's tokens do not depend on what else is in the batch.
        draws = [torch.rand(1, generator=rows[i].generator, device=device) for i in seeded]
        u.index_copy_(0, _to_device(seeded, torch.long, device), torch.cat(draws))
    return u


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first cumulative weight above u * total, per row: a draw from w / sum(w).
    A zero weight never wins (its interval is empty). Overwrites w."""
    c = w.cumsum_(dim=-1)
    total = c[:, -1:]
    # u < 1, but u * total can round up to total: stay strictly below it.
    r = (u[:, None] * total).minimum(torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(c, r, right=True).clamp_(max=w.shape[1] - 1)


def _min_p_limit(params: list[SamplingParams], like: torch.Tensor) -> torch.Tensor | None:
    """log(min_p) per row (-inf where off): p_i < min_p * p_max <=> logit_i < max + log(min_p)."""
    min_p = [p.min_p for p in params]
    if not any(m > 0.0 for m in min_p):
        return None
    return torch.log(_to_device(min_p, like.dtype, like.device))[:, None]


def _sample_full(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    top = x.max(dim=-1, keepdim=True).values
    w = x - top
    log_min_p = _min_p_limit(params, x)
    if log_min_p is not None:
        w = w.masked_fill(w < log_min_p, _NEG_INF)
    return _inverse_cdf(w.exp_(), u)[:, 0]


def _sample_truncated(
    x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor
) -> torch.Tensor:
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    k_cand = vocab
    if x.device.type == "cpu":
        k_cand = min(vocab, max(max(top_k), _CPU_CANDIDATES))
    if k_cand >= vocab:
        vals, idx = x.sort(dim=-1, descending=True)
        lse_full = None
    else:
        vals, idx = x.topk(k_cand, dim=-1)
        needs_full = any(p.top_p < 1.0 and k == 0 for p, k in zip(params, top_k, strict=True))
        lse_full = None
        if needs_full:
            # top-p's normaliser: the whole vocabulary that min-p leaves
            log_min_p = _min_p_limit(params, x)
            xf = x
            if log_min_p is not None:
                xf = x.masked_fill(x - x.max(dim=-1, keepdim=True).values < log_min_p, _NEG_INF)
            lse_full = xf.logsumexp(dim=-1)
    pos, covered = _truncate_and_draw(vals, params, top_k, u, lse_full)
    tokens = idx.gather(1, pos)[:, 0]
    if covered is not None and k_cand < vocab:
        redo = (~covered).nonzero()[:, 0].tolist()  # a host check: CPU only, where it is free
        if redo:
            r = torch.tensor(redo)
            sub_p = [params[i] for i in redo]
            sub_x = x.index_select(0, r)
            vals, idx = sub_x.sort(dim=-1, descending=True)
            pos, _ = _truncate_and_draw(vals, sub_p, [top_k[i] for i in redo], u[r], None)
            tokens[r] = idx.gather(1, pos)[:, 0]
    return tokens


def _truncate_and_draw(
    vals: torch.Tensor,
    params: list[SamplingParams],
    top_k: list[int],
    u: torch.Tensor,
    lse_full: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """On candidates sorted best first: min-p drops tokens below min_p times the best one's
    probability; top-k keeps values >= the k-th; top-p drops every token whose better tokens
    already hold top_p of the probability that is left (over the top-k set, or over the whole
    vocabulary, whose log-normaliser is `lse_full` when the candidates are not all of it); then
    the draw. Returns the chosen position and, when top-p applies, whether the candidates held
    enough probability for the cut to be exact."""
    device = vals.device
    log_min_p = _min_p_limit(params, vals)
    if log_min_p is not None:
        vals = vals.masked_fill(vals - vals[:, :1] < log_min_p, _NEG_INF)
    has_k = _to_device([k > 0 for k in top_k], torch.bool, device)
    if any(top_k):
        k = _to_device([max(k, 1) - 1 for k in top_k], torch.long, device)
        kth = vals.gather(1, k[:, None]).masked_fill(~has_k[:, None], _NEG_INF)
        vals = vals.masked_fill(vals < kth, _NEG_INF)
    covered = None
    if any(p.top_p < 1.0 for p in params):
        # top_p = 1 rows get a bound they cannot reach: rounding must not cut their tail.
        tp = _to_device([p.top_p if p.top_p < 1.0 else 2.0 for p in params], vals.dtype, device)
        lse = vals.logsumexp(dim=-1)
        if lse_full is not None:
            lse = torch.where(has_k, lse, lse_full)
        prob = (vals - lse[:, None]).exp()
        cum = prob.cumsum(dim=-1)
        vals = vals.masked_fill((cum - prob) >= tp[:, None], _NEG_INF)
        covered = (cum[:, -1] >= tp) | has_k | (tp > 1.0)
    w = vals - vals[:, :1]
    return _inverse_cdf(w.exp_(), u), covered


def _with_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerRow], want: list[bool]
) -> PendingSample:
    """Raw logprobs for the rows that asked, packed with every row's token for one host sync."""
    n = len(rows)
    asked = [i for i in range(n) if want[i]]
    m = len(asked)
    if m == n:
        x, tok = raw, tokens
    else:
        idx = _to_device(asked, torch.long, raw.device)
        x, tok = raw.index_select(0, idx), tokens.index_select(0, idx)
    ks = [rows[i].params.logprobs or 0 for i in asked]
    k_max = min(max(ks), raw.shape[1])
    # log_softmax(x)[t] = x[t] - logsumexp(x); ranks and top-k need only the raw order.
    lse = x.logsumexp(dim=-1, keepdim=True)
    chosen = x.gather(1, tok[:, None])
    ranks = (x > chosen).sum(dim=-1, dtype=torch.int32) + 1  # int32: twice as fast on CPU
    parts = [tokens.double(), (chosen - lse)[:, 0].double(), ranks.double()]
    if k_max:
        top = x.topk(k_max, dim=-1)
        parts += [top.indices.double().flatten(), (top.values - lse).double().flatten()]

    def decode(flat: list) -> SamplerOutput:
        tok_ids = [int(t) for t in flat[:n]]
        chosen_lp = [0.0] * n
        rank_l = [0] * n
        top_out: list[list[tuple[int, float]] | None] = [None] * n
        top_ids = flat[n + 2 * m : n + 2 * m + m * k_max]
        top_vals = flat[n + 2 * m + m * k_max :]
        for j, i in enumerate(asked):
            chosen_lp[i] = flat[n + j]
            rank_l[i] = int(flat[n + m + j])
            a = j * k_max
            top_out[i] = [(int(top_ids[a + q]), top_vals[a + q]) for q in range(min(ks[j], k_max))]
        return SamplerOutput(tok_ids, chosen_lp, rank_l, top_out)

    # The one host sync of the step (PendingSample.result): everything packed into one tensor.
    return PendingSample(tokens, torch.cat(parts), decode)


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
    ranks = (lp > chosen).sum(dim=-1, dtype=torch.int32) + 1
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
