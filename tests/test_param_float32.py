"""Sampling parameters are checked against what float32 (the sampler's arithmetic) holds: values
that underflow or overflow there are refused, values at the bounds sample sanely."""

from __future__ import annotations

import pytest
import torch

from asyncllm import protocol as P
from asyncllm.engine.sampler import Sampler, SamplerRow
from asyncllm.sampling_params import (
    FACTOR_MAX,
    FACTOR_MIN,
    FLOAT32_MIN_NORMAL,
    SamplingParams,
)

BAD = [
    ("top_p", 1e-50),  # 0 in float32: every token cut
    ("top_p", 1e-40),  # subnormal
    ("repetition_penalty", 1e-50),  # 0 in float32: logits / 0
    ("repetition_penalty", 1e50),  # inf in float32
    ("temperature", 1e50),
]


@pytest.mark.parametrize("name,value", BAD)
def test_values_float32_cannot_hold_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})
    with pytest.raises(P.ProtocolError) as e:
        P.parse_params({name: value})
    assert e.value.code == P.INVALID_REQUEST and name in e.value.message


def test_float32_really_loses_them():
    assert torch.tensor(1e-50, dtype=torch.float32).item() == 0.0
    assert torch.tensor(FLOAT32_MIN_NORMAL, dtype=torch.float32).item() > 0.0
    assert torch.isinf(torch.tensor(1e50, dtype=torch.float32))


@pytest.mark.parametrize(
    "kw",
    [
        {"top_p": FLOAT32_MIN_NORMAL},
        {"repetition_penalty": FACTOR_MIN},
        {"repetition_penalty": FACTOR_MAX},
        {"temperature": FACTOR_MAX},
        {"temperature": 0.7, "top_p": FLOAT32_MIN_NORMAL, "repetition_penalty": FACTOR_MIN},
    ],
)
def test_bounds_sample_valid_tokens(kw):
    sp = SamplingParams(logprobs=2, **kw)
    P.parse_params(kw)  # the wire accepts them too
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 1e3  # large logits: the penalty's headroom is for these
    rows = [SamplerRow(sp, list(range(10)), [3, 4], None) for _ in range(64)]
    out = Sampler()(logits, rows)
    ids = torch.tensor(out.token_ids)
    assert ids.min() >= 0 and ids.max() < 50
    if kw.get("top_p") == FLOAT32_MIN_NORMAL:  # only the best token survives the cut
        if "repetition_penalty" not in kw:
            assert out.token_ids == logits.argmax(-1).tolist()
