"""Sampling parameters through the whole engine: seeds independent of the batch, stop strings,
output kinds, raw logprobs under sampling, min_tokens with EOS, allowed ids."""

from __future__ import annotations

import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.sampling_params import RequestOutputKind

PROMPT = "Once upon a time there was a little model that could"


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(tiny_model_dir)


def _gen(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def test_seed_gives_the_same_text_whatever_the_batch(llm):
    mine = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True, seed=7)
    alone = _gen(llm, PROMPT, mine)[0].outputs[0]
    others = [
        SamplingParams(temperature=1.2, max_tokens=9, ignore_eos=True),
        mine,
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=5, max_tokens=12, ignore_eos=True, seed=99),
    ]
    batch = _gen(llm, ["Hello world", PROMPT, "The sky is", "Café"], others)
    assert batch[1].outputs[0].token_ids == alone.token_ids
    assert batch[1].outputs[0].text == alone.text
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True, seed=8)
    assert _gen(llm, PROMPT, other_seed)[0].outputs[0].token_ids != alone.token_ids
    # n > 1 with a seed is reproducible too, and its samples differ.
    many = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=5)
    a = [c.token_ids for c in _gen(llm, PROMPT, many)[0].outputs]
    b = [c.token_ids for c in _gen(llm, ["Hello", PROMPT], [mine, many])[1].outputs]
    assert a == b and len({tuple(t) for t in a}) > 1


def _greedy_text(llm: LLM, max_tokens: int = 24) -> tuple[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = _gen(llm, PROMPT, params)[0].outputs[0]
    return out.text, out.token_ids


def _straddling_stop(llm: LLM, text: str) -> str:
    """A 3-character piece of the text that no single token of it contains."""
    tok = llm.get_tokenizer()
    pieces = {tok.decode([t]) for t in tok.encode(text)}
    for a in range(2, len(text) - 3):
        stop = text[a : a + 3]
        if stop.strip() and text.index(stop) == a and not any(stop in p for p in pieces):
            return stop
    pytest.skip("no stop string straddles tokens in this model's greedy text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(llm, include):
    text, ids = _greedy_text(llm)
    stop = _straddling_stop(llm, text)
    params = SamplingParams(
        temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=include
    )
    out = _gen(llm, PROMPT, params)[0].outputs[0]
    pos = text.index(stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: pos + (len(stop) if include else 0)]
    assert out.token_ids == ids[: len(out.token_ids)] and len(out.token_ids) < len(ids)


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY])
def test_output_kinds(llm, kind):
    text, ids = _greedy_text(llm, 20)
    stop = _straddling_stop(llm, text)
    engine = llm.llm_engine
    common = dict(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("cum", PROMPT, SamplingParams(**common, stop=[stop]))
    engine.add_request("other", PROMPT, SamplingParams(**common, stop=[stop], output_kind=kind))
    outs: dict[str, list] = {"cum": [], "other": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id].append(o)
    final = outs["cum"][-1].outputs[0]
    assert final.text == text[: text.index(stop)]
    mine = outs["other"]
    if kind is RequestOutputKind.FINAL_ONLY:
        assert len(mine) == 1 and mine[0].finished
        assert mine[0].outputs[0].text == final.text
        assert mine[0].outputs[0].token_ids == final.token_ids
    else:
        assert len(mine) > 1
        assert "".join(o.outputs[0].text for o in mine) == final.text
        assert sum((o.outputs[0].token_ids for o in mine), []) == final.token_ids
        # Each CUMULATIVE text extends the previous one.
        texts = [o.outputs[0].text for o in outs["cum"]]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_sampled_logprobs_are_raw(llm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(
        temperature=0.7,
        top_k=20,
        repetition_penalty=1.3,
        max_tokens=8,
        ignore_eos=True,
        logprobs=2,
        seed=3,
    )
    prompt = [5, 17, 42, 99]
    comp = _gen(llm, {"prompt_token_ids": prompt}, params)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + comp.token_ids])).logits[0], -1)
    for k, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + k]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert entry[tok].decoded_token == llm.get_tokenizer().decode([tok])
        top2 = row.topk(2).indices.tolist()
        assert set(top2) <= set(entry)


def test_min_tokens_holds_back_eos(llm):
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    params = SamplingParams(temperature=1.0, max_tokens=10, min_tokens=4, logit_bias={eos: 100.0})
    out = _gen(llm, PROMPT, params)[0].outputs[0]
    assert eos not in out.token_ids[:4]
    assert out.token_ids[4] == eos and len(out.token_ids) == 5
    assert out.finish_reason == "stop"
    # Without min_tokens the biased EOS ends it at once.
    out = _gen(llm, PROMPT, SamplingParams(max_tokens=10, logit_bias={eos: 100.0}))[0]
    assert out.outputs[0].token_ids == [eos]


def test_allowed_token_ids(llm):
    allowed = [10, 20, 30, 40]
    params = SamplingParams(
        temperature=1.0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed
    )
    out = _gen(llm, PROMPT, params)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 12


def test_skip_special_tokens_end_to_end(llm):
    tok = llm.get_tokenizer()
    specials = ["<|im_start|>", "<|endoftext|>"]  # special tokens that are not the EOS
    special_ids = tok.convert_tokens_to_ids(specials)
    normal_ids = [t for t in tok.encode(" the sky is blue") if t not in tok.all_special_ids]
    common = dict(
        temperature=1.0,
        max_tokens=24,
        ignore_eos=True,
        seed=3,
        allowed_token_ids=special_ids + normal_ids,
    )
    kept = _gen(llm, PROMPT, SamplingParams(skip_special_tokens=False, **common))[0].outputs[0]
    skipped = _gen(llm, PROMPT, SamplingParams(skip_special_tokens=True, **common))[0].outputs[0]
    ids = kept.token_ids
    assert skipped.token_ids == ids  # same seed, same tokens: only the text differs
    assert set(ids) & set(special_ids) and set(ids) - set(special_ids)  # both kinds generated
    assert kept.text == tok.decode(ids, skip_special_tokens=False)
    assert any(s in kept.text for s in specials)
    assert skipped.text == tok.decode(ids, skip_special_tokens=True)
    assert skipped.text and not any(s in skipped.text for s in specials)
    # only special tokens: nothing is left of the text
    only = dict(common, allowed_token_ids=special_ids[:1], max_tokens=3)
    assert _gen(llm, PROMPT, SamplingParams(**only))[0].outputs[0].text == ""
    out = _gen(llm, PROMPT, SamplingParams(skip_special_tokens=False, **only))[0].outputs[0]
    assert out.text == "<|im_start|>" * 3
