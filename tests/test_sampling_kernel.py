"""The fused Gumbel-max sampling kernel (kernels/sampling.py) and the sampler's fused path:
frequencies against softmax(x / T) and min-p (chi-square, fixed seeds), greedy rows equal to
torch.argmax (ties included), the draw independent of the vocabulary split, seeded rows
reproducible and independent of the batch, logprobs and top-k/top-p rows as on the unfused path.
Without CUDA the kernel runs under Triton's interpreter (~50 ms a program: few rows there)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from asyncllm.engine.kernels import sampling  # noqa: E402
from asyncllm.engine.kernels.sampling import gumbel_argmax  # noqa: E402
from asyncllm.engine.sampler import Sampler, SamplerRow  # noqa: E402
from asyncllm.sampling_params import SamplingParams  # noqa: E402
from tests.test_sampler import LOGITS, _chi2_pvalue, _expected  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# Independent draws = rows (one program each under the interpreter).
DRAWS = 200_000 if CUDA else 240


def _counts(tokens: torch.Tensor, vocab: int) -> list[int]:
    return torch.bincount(tokens.cpu(), minlength=vocab).tolist()


def test_frequencies_follow_temperature_and_min_p():
    torch.manual_seed(7)
    half = DRAWS // 2
    x = LOGITS.to(DEV).expand(DRAWS, -1).contiguous().to(torch.bfloat16)  # exact in bf16
    t = 0.5
    temps = torch.full((DRAWS,), t, device=DEV)
    # The second half has min_p = 0.2: the floor is max + T log(min_p) on the unscaled logits.
    floor = torch.full((DRAWS,), float("-inf"), device=DEV)
    floor[half:] = float(LOGITS.max()) + t * float(torch.log(torch.tensor(0.2)))
    seeds = torch.randint(0, 2**62, (DRAWS,), device=DEV)
    tok = gumbel_argmax(x, temps, seeds, floor)
    plain, minp = _counts(tok[:half], len(LOGITS)), _counts(tok[half:], len(LOGITS))
    exp_plain, exp_minp = _expected(temperature=t), _expected(temperature=t, min_p=0.2)
    assert all(c == 0 for c, p in zip(minp, exp_minp, strict=True) if p == 0), minp
    assert _chi2_pvalue(plain, exp_plain) > 1e-3, plain
    assert _chi2_pvalue(minp, exp_minp) > 1e-3, minp
    # Power: the plain half rejects temperature 1 (the kernel must scale by T).
    assert _chi2_pvalue(plain, _expected()) < 1e-4, plain


def test_greedy_rows_are_torch_argmax_with_ties(monkeypatch):
    vocab = 3000  # three splits of 1024 for a few rows
    x = torch.randn(3, vocab, device=DEV)
    x[1, 5] = x[1, 7] = 10.0  # a tie inside one split: the smaller index
    x[2, 100] = x[2, 2500] = 10.0  # a tie across splits
    x[0, 2999] = 9.0  # the last token, in the last partial block
    zeros = torch.zeros(3, device=DEV)
    seeds = torch.arange(3, device=DEV)
    got = gumbel_argmax(x, zeros, seeds)
    assert got.tolist() == x.argmax(dim=-1).tolist() == [2999, 5, 100]
    monkeypatch.setattr(sampling, "_TARGET_PROGRAMS", 1)  # one split per row
    assert gumbel_argmax(x, zeros, seeds).tolist() == [2999, 5, 100]


def test_the_draw_does_not_depend_on_the_split(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(2, 3000, device=DEV)
    temps = torch.tensor([1.0, 0.7], device=DEV)
    seeds = torch.tensor([11, 12], device=DEV)
    split = gumbel_argmax(x, temps, seeds)
    monkeypatch.setattr(sampling, "_TARGET_PROGRAMS", 1)
    assert gumbel_argmax(x, temps, seeds).tolist() == split.tolist()
    # A different seed is another draw: over 16 seeds, not all the same token.
    many = [
        gumbel_argmax(x[:1], temps[:1], torch.tensor([s], device=DEV)).item() for s in range(16)
    ]
    assert len(set(many)) > 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(DEV).manual_seed(seed)


def test_sampler_fused_path_keeps_every_rule():
    torch.manual_seed(5)
    vocab = 64
    logits = (torch.randn(7, vocab, device=DEV) * 2).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=42),
        SamplingParams(temperature=0.9, top_k=3, seed=9),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(temperature=0.6, logprobs=2),
        SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
        SamplingParams(temperature=0.7, top_p=0.5),
    ]

    def rows(order=range(7)) -> list[SamplerRow]:
        return [
            SamplerRow(params[i], [1], [2], _gen(params[i].seed) if params[i].seed else None)
            for i in order
        ]

    fused = Sampler(fused=True)
    out = fused(logits, rows())
    raw = logits.float()
    assert out.token_ids[0] == int(raw[0].argmax())
    assert out.token_ids[2] in raw[2].topk(3).indices.tolist()
    p3 = torch.softmax(raw[3], -1)
    assert p3[out.token_ids[3]] >= 0.5 * p3.max()
    lp = torch.log_softmax(raw[4], -1)
    assert out.logprobs[4] == pytest.approx(float(lp[out.token_ids[4]]), abs=1e-5)
    assert out.ranks[4] == int((lp > lp[out.token_ids[4]]).sum()) + 1
    assert [t for t, _ in out.top_logprobs[4]] == lp.topk(2).indices.tolist()
    assert out.token_ids[5] == 3
    # top_p=0.5 keeps the smallest set of best tokens holding half of the probability.
    p6 = torch.softmax(raw[6] / 0.7, -1)
    sp, si = p6.sort(descending=True)
    keep = si[: int(((sp.cumsum(0) - sp) < 0.5).sum())].tolist()
    assert out.token_ids[6] in keep
    # Seeded rows: the same tokens again, and alone (no neighbours).
    again = fused(logits, rows())
    assert [again.token_ids[i] for i in (1, 2)] == [out.token_ids[i] for i in (1, 2)]
    alone = fused(logits[[1, 2]], rows([1, 2]))
    assert alone.token_ids == [out.token_ids[1], out.token_ids[2]]
    # Greedy rows give what the unfused sampler gives.
    plain = Sampler(fused=False)(logits, rows())
    assert [plain.token_ids[i] for i in (0, 5)] == [out.token_ids[i] for i in (0, 5)]


def test_env_switch(monkeypatch):
    monkeypatch.setenv("ASYNCLLM_SAMPLER_FUSED", "0")
    assert Sampler()._use_fused(torch.device("cuda")) is False
    monkeypatch.delenv("ASYNCLLM_SAMPLER_FUSED")
    assert Sampler()._use_fused(torch.device("cpu")) is False  # the CPU keeps the scan
    assert Sampler()._use_fused(torch.device("cuda")) is True


@pytest.mark.gpu
def test_cuda_fused_sampler_frequencies_and_no_stream_sync():
    torch.manual_seed(2)
    draws = 200_000
    kw = dict(temperature=0.8, min_p=0.05)
    batch = LOGITS.to(DEV).expand(draws, -1).contiguous()
    out = Sampler()(batch, [SamplerRow(SamplingParams(**kw), [], [], None) for _ in range(draws)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(LOGITS)).tolist()
    assert _chi2_pvalue(counts, _expected(**kw)) > 1e-3
