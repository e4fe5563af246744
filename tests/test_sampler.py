"""The sampler against the definitions: sampled frequencies (chi-square), penalties and bias
computed directly, masks, seeds independent of the batch, greedy, logprobs and ranks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from asyncllm.engine.sampler import Sampler, SamplerRow, compute_prompt_logprobs, process_logits
from asyncllm.sampling_params import SamplingParams

V = 8
DRAWS = 20_000
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.2])


def _row(params: SamplingParams, prompt=(), output=(), seed: int | None = None) -> SamplerRow:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return SamplerRow(params, list(prompt), list(output), gen)


def _chi2_pvalue(observed: list[int], expected_probs: list[float]) -> float:
    """Pearson chi-square over the support of `expected_probs`."""
    total = sum(observed)
    cells = [(o, p * total) for o, p in zip(observed, expected_probs, strict=True) if p > 0]
    stat = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # Wilson-Hilferty normal approximation of the chi-square tail
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


def _draw(params: SamplingParams, logits: torch.Tensor = LOGITS, draws: int = DRAWS) -> list[int]:
    """Counts per token over `draws` rows of one batch, each row an independent draw."""
    torch.manual_seed(1234)
    batch = logits.expand(draws, -1).contiguous()
    out = Sampler()(batch, [_row(params) for _ in range(draws)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(logits)).tolist()


def _softmax(xs: list[float]) -> list[float]:
    m = max(x for x in xs if x != -math.inf)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logits=LOGITS) -> list[float]:
    """The definitions, written out one token at a time, in vLLM's order: temperature, min-p,
    top-k, top-p."""
    xs = [x / temperature for x in logits.tolist()]
    order = sorted(range(len(xs)), key=lambda i: -xs[i])
    if min_p:
        probs = _softmax(xs)
        top = max(probs)
        xs = [x if probs[i] >= min_p * top else -math.inf for i, x in enumerate(xs)]
    if top_k:
        for i in order[top_k:]:
            xs[i] = -math.inf
    if top_p < 1.0:
        probs = _softmax(xs)
        mass = 0.0
        for i in order:
            if mass >= top_p:  # the tokens before this one already hold top_p
                xs[i] = -math.inf
            mass += probs[i]
    return _softmax(xs)


CASES = {
    "plain": dict(),
    "temperature_0.5": dict(temperature=0.5),
    "temperature_2": dict(temperature=2.0),
    "top_k_3": dict(top_k=3),
    "top_p_0.6": dict(top_p=0.6),
    "top_k_5_top_p_0.8_t_0.7": dict(top_k=5, top_p=0.8, temperature=0.7),
    "min_p_0.2": dict(min_p=0.2),
    "all": dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frequencies_match_the_distribution(case):
    kw = CASES[case]
    counts = _draw(SamplingParams(**kw))
    expected = _expected(**kw)
    for tok, (c, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0:
            assert c == 0, f"token {tok} is outside the support but was drawn {c} times"
    assert _chi2_pvalue(counts, expected) > 1e-3
    # The test has power: the same counts reject the distribution without this case's settings.
    if kw:
        assert _chi2_pvalue(counts, _expected()) < 1e-6


def test_top_k_top_p_min_p_truncate_exactly():
    assert _expected(top_k=3)[3:] == [0.0] * 5
    counts = _draw(SamplingParams(top_k=3))
    assert counts[3:] == [0] * 5 and all(c > 0 for c in counts[:3])
    # top_p=0.3 keeps only the best token (it alone holds more than 0.3).
    assert _draw(SamplingParams(top_p=0.3), draws=2000)[1:] == [0] * 7
    # min_p=0.5 keeps tokens with p >= 0.5 * p_max: logits within log(2) of the best.
    counts = _draw(SamplingParams(min_p=0.5), draws=2000)
    assert counts[:2] != [0, 0] and counts[2:] == [0] * 6


@pytest.mark.parametrize("vocab", [4, 1000])
def test_min_p_applies_before_top_p(vocab):
    """By hand. vocab 4: p = .4, .3, .2, .1 and min_p=0.3 drops the last (.1 < .12); vocab 1000:
    p = .36, .27, .18 and the rest (.19) spread thin, min_p=0.1 drops the rest (each < .036).
    Either way what is left renormalises to .444, .333, .222, and top_p=0.75 drops the third
    (the two before it hold .778). Min-p after top-p would keep the third (.7 or .63 < .75
    before it). vocab 1000 takes the CPU's candidate path (a full-vocabulary top-p normaliser)."""
    if vocab == 4:
        probs, min_p = [0.4, 0.3, 0.2, 0.1], 0.3
    else:
        probs, min_p = [0.36, 0.27, 0.18] + [0.19 / (vocab - 3)] * (vocab - 3), 0.1
    logits = torch.tensor(probs).log()
    expected = _expected(top_p=0.75, min_p=min_p, logits=logits)
    assert {i for i, p in enumerate(expected) if p} == {0, 1}
    counts = _draw(SamplingParams(top_p=0.75, min_p=min_p), logits=logits, draws=3000)
    assert {i for i, c in enumerate(counts) if c} == {0, 1}
    # the same draw without min-p: top-p alone keeps the third token
    counts = _draw(SamplingParams(top_p=0.75), logits=logits, draws=3000)
    assert {i for i, c in enumerate(counts) if c} == {0, 1, 2}


def _direct(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]):
    """Penalties and bias by their definitions, one token at a time."""
    x = logits.tolist()
    if p.allowed_token_ids:
        x = [v if i in p.allowed_token_ids else -math.inf for i, v in enumerate(x)]
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | p._eos_token_ids:
            x[t] = -math.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return torch.tensor(x)


def test_penalties_bias_and_masks_match_their_definitions():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(5, vocab) * 3
    eos = SamplingParams(min_tokens=4, stop_token_ids=[7], logit_bias={7: 5.0})
    eos._eos_token_ids = {3}
    specs = [
        (SamplingParams(repetition_penalty=1.3), [1, 2, 3, 9], [4, 4, 9]),
        (SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4), [1, 2], [4, 4, 4, 9, 2]),
        (
            SamplingParams(
                repetition_penalty=0.8,
                frequency_penalty=-1.0,
                presence_penalty=1.5,
                logit_bias={0: 3.0, 4: -2.5, 49: 10.0},
            ),
            [0, 5, 6],
            [4, 5, 5],
        ),
        (SamplingParams(allowed_token_ids=[2, 4, 11], logit_bias={4: 1.0, 5: 9.0}), [], [1]),
        (eos, [3], [1, 2]),
    ]
    rows = [_row(p, prompt, out) for p, prompt, out in specs]
    before = logits.clone()
    got = process_logits(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are not modified
    for i, (p, prompt, out) in enumerate(specs):
        torch.testing.assert_close(got[i], _direct(logits[i], p, prompt, out))
    # min_tokens masks EOS and stop ids only until min_tokens outputs exist.
    assert got[4, 3] == -math.inf and got[4, 7] == -math.inf
    done = process_logits(logits[4:], [_row(eos, [3], [1, 2, 5, 6])])
    assert done[0, 3] == logits[4, 3] and done[0, 7] == logits[4, 7] + 5.0


def test_min_tokens_and_ignore_eos_in_sampling():
    logits = torch.full((4, V), 0.0)
    logits[:, 3] = 50.0  # EOS is by far the best token
    logits[:, 5] = 40.0  # then a stop token id
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])
    p._eos_token_ids = {3}
    q = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    q._eos_token_ids = {3}
    rows = [_row(p, [], []), _row(p, [], [1]), _row(p, [], [1, 1]), _row(q, [], [])]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] not in (3, 5) and out.token_ids[1] not in (3, 5)
    assert out.token_ids[2] == 3
    # ignore_eos: EOS still cannot be one of the min_tokens (vLLM masks every stop id)
    assert out.token_ids[3] not in (3, 5)


def test_allowed_token_ids_sampled_in_proportion():
    allowed = [1, 4, 6]
    counts = _draw(SamplingParams(allowed_token_ids=allowed))
    assert all(c == 0 for t, c in enumerate(counts) if t not in allowed)
    masked = torch.full((V,), -math.inf)
    masked[allowed] = LOGITS[allowed]
    assert _chi2_pvalue(counts, _expected(logits=masked)) > 1e-3


def test_logit_bias_moves_greedy_choice():
    rows = [_row(SamplingParams(temperature=0, logit_bias={7: 4.0})), _row(SamplingParams())]
    out = Sampler()(LOGITS.expand(2, -1).contiguous(), rows)
    assert out.token_ids[0] == 7  # -1.2 + 4 beats 2.0


def test_greedy_is_argmax_mixed_with_sampled_rows():
    torch.manual_seed(3)
    logits = torch.randn(16, 100) * 4
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams() for i in range(16)]
    out = Sampler()(logits, [_row(p) for p in params])
    for i in range(1, 16, 2):
        assert out.token_ids[i] == int(logits[i].argmax())
    # The all-greedy fast path agrees.
    fast = Sampler()(logits, [_row(SamplingParams(temperature=0)) for _ in range(16)])
    assert fast.token_ids == logits.argmax(-1).tolist()
    assert fast.top_logprobs == [None] * 16


def _run_seeded(
    seed: int, neighbours: int, vocab: int, steps: int = 25, greedy_neighbours: bool = False
):
    """The seeded row's tokens over `steps` steps, placed in the middle of a batch."""
    torch.manual_seed(999 + neighbours)  # neighbours' noise differs from run to run
    gen = torch.Generator().manual_seed(seed)
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=seed)
    toks = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        row_logits = torch.randn(1, vocab, generator=g) * 2
        others = torch.randn(neighbours, vocab) * 2
        logits = torch.cat([others[: neighbours // 2], row_logits, others[neighbours // 2 :]])
        rows = []
        for k in range(neighbours):
            if greedy_neighbours and k % 2:
                rows.append(_row(SamplingParams(temperature=0)))
            elif k % 3 == 0:
                rows.append(_row(SamplingParams(temperature=1.5, seed=k), seed=k))
            else:
                rows.append(_row(SamplingParams(top_p=0.5, logprobs=2)))
        rows.insert(neighbours // 2, SamplerRow(mine, [1, 2], list(toks), gen))
        toks.append(Sampler()(logits, rows).token_ids[neighbours // 2])
    return toks


@pytest.mark.parametrize("vocab", [64, 3000])  # 3000: the CPU's top-p candidate path
def test_seeded_rows_do_not_depend_on_the_batch(vocab):
    alone = _run_seeded(seed=42, neighbours=0, vocab=vocab)
    assert _run_seeded(seed=42, neighbours=7, vocab=vocab) == alone
    assert _run_seeded(seed=42, neighbours=10, vocab=vocab, greedy_neighbours=True) == alone
    assert _run_seeded(seed=43, neighbours=0, vocab=vocab) != alone
    assert len(set(alone)) > 3  # it really samples


def test_cpu_candidates_cut_exactly_like_a_full_sort(monkeypatch):
    """Top-k/top-p on the CPU look at the best few hundred tokens first, and sort everything for
    rows whose candidates hold less than top_p: the same seeded draws pick the same tokens."""
    from asyncllm.engine import sampler as sampler_mod

    torch.manual_seed(8)
    vocab, n = 3000, 120
    scale = torch.tensor([0.05 if i % 3 == 0 else 4.0 for i in range(n)])[:, None]
    logits = torch.randn(n, vocab) * scale  # every third row nearly flat: the fallback runs
    params = [
        SamplingParams(top_p=[0.5, 0.9, 0.99][i % 3], top_k=[0, 0, 0, 40, 900][i % 5], seed=i)
        for i in range(n)
    ]
    flat_p = torch.softmax(logits[0], -1).topk(sampler_mod._CPU_CANDIDATES).values.sum()
    assert flat_p < 0.5  # the candidates of a flat row really do not cover its top_p

    def run(candidates: int) -> list[int]:
        monkeypatch.setattr(sampler_mod, "_CPU_CANDIDATES", candidates)
        rows = [_row(p, seed=p.seed) for p in params]
        return Sampler()(logits, rows).token_ids

    assert run(256) == run(vocab)


def test_logprobs_and_ranks_are_raw_log_softmax():
    torch.manual_seed(5)
    logits = torch.randn(6, 30) * 3
    params = [
        SamplingParams(logprobs=3, repetition_penalty=1.5, temperature=0.5),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(temperature=0, logprobs=5, logit_bias={0: 100.0}),
        SamplingParams(logprobs=30, top_k=2),
        SamplingParams(temperature=0, logprobs=1),
    ]
    out = Sampler()(logits, [_row(p, [1, 2, 3], [4]) for p in params])
    ref = torch.log_softmax(logits, -1)
    for i, p in enumerate(params):
        tok = out.token_ids[i]
        if p.logprobs is None:
            assert out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-6)
        assert out.ranks[i] == int((ref[i] > ref[i, tok]).sum()) + 1
        top = out.top_logprobs[i]
        assert top is not None and len(top) == p.logprobs
        vals, ids = ref[i].topk(p.logprobs)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.token_ids[3] == 0 and out.ranks[5] == 1


def test_prompt_logprobs():
    torch.manual_seed(6)
    logits = torch.randn(4, 20)
    targets = [3, 0, 19, 7]
    got = compute_prompt_logprobs(logits, targets, 2)
    ref = torch.log_softmax(logits, -1)
    for i, d in enumerate(got):
        lp, rank = d[targets[i]]
        assert lp == pytest.approx(ref[i, targets[i]].item(), abs=1e-6)
        assert rank == int((ref[i] > ref[i, targets[i]]).sum()) + 1
        ids = ref[i].topk(2).indices.tolist()
        assert set(d) == set(ids) | {targets[i]}
        assert d[ids[0]][1] == 1 and d[ids[1]][1] == 2
    assert compute_prompt_logprobs(logits, targets, 0)[0].keys() == {3}
    with pytest.raises(ValueError):
        compute_prompt_logprobs(logits, targets[:2], 1)


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="sampler rows"):
        Sampler()(torch.zeros(2, V), [_row(SamplingParams())])


@pytest.mark.gpu
def test_cuda_one_host_sync_and_seeds():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vocab, n = 5000, 64
    logits = torch.randn(n, vocab, device=dev) * 3
    params = [
        SamplingParams(
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_p=[1.0, 0.9][i % 2],
            top_k=[0, 0, 50][i % 3],
            min_p=[0.0, 0.05][i % 2],
            repetition_penalty=1.2 if i % 5 == 0 else 1.0,
            presence_penalty=0.5 if i % 7 == 0 else 0.0,
            logit_bias={3: 2.0} if i % 11 == 0 else None,
            logprobs=2 if i % 3 == 0 else None,
            seed=i if i % 2 else None,
        )
        for i in range(n)
    ]

    def rows():
        return [
            SamplerRow(p, [1, 2, 3], [4, 5], torch.Generator(dev).manual_seed(p.seed))
            if p.seed is not None
            else SamplerRow(p, [1, 2, 3], [4, 5], None)
            for p in params
        ]

    sampler = Sampler()
    first = sampler(logits, rows())
    torch.cuda.synchronize()
    # The one host wait is PendingSample.result()'s event (the pinned copy of the packed
    # results); the stream itself is never synchronized, which sync-debug mode would report.
    waits = []
    real_sync = torch.cuda.Event.synchronize

    def counted(ev):
        waits.append(ev)
        return real_sync(ev)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.Event.synchronize = counted
            again = sampler(logits, rows())
    finally:
        torch.cuda.Event.synchronize = real_sync
        torch.cuda.set_sync_debug_mode("default")
    syncs = [
        w for w in record if "synchroniz" in str(w.message) and "prototype" not in str(w.message)
    ]
    assert syncs == [], [str(w.message) for w in syncs]
    assert len(waits) == 1
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    assert [first.token_ids[i] for i in seeded] == [again.token_ids[i] for i in seeded]
    # Seeded rows alone give the same tokens as inside the batch.
    alone = sampler(logits[seeded], [rows()[i] for i in seeded])
    assert alone.token_ids == [first.token_ids[i] for i in seeded]
    greedy = [i for i, p in enumerate(params) if p.greedy and not p.logit_bias]
    proc = process_logits(logits, rows())
    assert [first.token_ids[i] for i in greedy] == proc[greedy].argmax(-1).tolist()


@pytest.mark.gpu
def test_cuda_sampled_frequencies():
    dev = torch.device("cuda")
    torch.manual_seed(1)
    kw = dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)
    draws = 200_000
    batch = LOGITS.to(dev).expand(draws, -1).contiguous()
    out = Sampler()(batch, [_row(SamplingParams(**kw)) for _ in range(draws)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=V).tolist()
    expected = _expected(**kw)
    assert all(c == 0 for c, p in zip(counts, expected, strict=True) if p == 0)
    assert _chi2_pvalue(counts, expected) > 1e-3


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -1),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("allowed_token_ids", []),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {1: float("nan")}),
        ("logit_bias", {"x": 1.0}),
        ("seed", 1.5),
    ],
)
def test_out_of_range_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"], detokenize=False)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"3": -100}).logit_bias == {3: -100.0}


def test_clone_is_equal_and_independent():
    p = SamplingParams(stop=["a"], stop_token_ids=[1], logit_bias={1: 2.0}, allowed_token_ids=[3])
    p._eos_token_ids = {7}
    q = p.clone()
    assert q == p and q is not p and q._eos_token_ids == {7}
    q.stop.append("b")
    q.stop_token_ids.append(2)
    q.logit_bias[5] = 1.0
    q.allowed_token_ids.append(4)
    q._eos_token_ids.add(8)
    assert (p.stop, p.stop_token_ids, p.logit_bias, p.allowed_token_ids, p._eos_token_ids) == (
        ["a"],
        [1],
        {1: 2.0},
        [3],
        {7},
    )
