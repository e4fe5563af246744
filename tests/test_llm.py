"""Issue 2's proofs: the engine's greedy tokens equal transformers' generate for every
architecture, through chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import pytest
import torch

from asyncllm import LLM, SamplingParams
from tests.tiny_models import ARCHITECTURES, hf_greedy

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time there was a little model that could",
    "Café, naïve, résumé",
    "def f(x):\n    return",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def references(tiny_model_dirs) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    refs = {}
    for arch, path in tiny_model_dirs.items():
        tok = AutoTokenizer.from_pretrained(path)
        refs[arch] = [hf_greedy(path, tok.encode(p), MAX_NEW) for p in PROMPTS]
    return refs


CONFIGS = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 5},  # every prompt is split across steps
    "preempting": {"num_kv_blocks": 10, "block_size": 4},  # 40 tokens for 5 sequences of ~20
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_transformers(tiny_model_dirs, references, arch, config):
    kwargs = dict(CONFIGS[config])
    if config == "preempting" and arch == "mistral":
        # Every layer windowed: blocks behind the window come back, so 10 blocks are plenty;
        # in chunks of 8 a sequence holds at most 4 of 4 tokens (window 5), and 6 run short.
        kwargs.update(num_kv_blocks=6, max_num_batched_tokens=8)
    llm = LLM(tiny_model_dirs[arch], **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == references[arch]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    stats = llm.llm_engine.get_stats()
    if config == "preempting":
        assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize(
    "arch", ["llama", "llama_yarn", "mistral", "qwen2_window", "gemma2", "gemma3", "phi3"]
)
def test_logprobs_match_transformers(tiny_model_dirs, arch):
    from transformers import AutoModelForCausalLM

    tiny_model_dir = tiny_model_dirs[arch]
    llm = LLM(tiny_model_dir)
    # 10 tokens in all: past the windows (5) of the windowed models
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    out = llm.generate({"prompt_token_ids": [5, 17, 42, 99]}, params, use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = [5, 17, 42, 99] + comp.token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for k, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        row = ref[3 + k]
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        assert entry[tok].rank == 1  # greedy picks the best token
        assert len(entry) >= 3
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
    assert comp.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs, strict=True)), abs=1e-4
    )


def test_prompt_logprobs_match_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_model_dir, max_num_batched_tokens=4)  # chunked: logprobs span chunks
    ids = [5, 17, 42, 99, 7, 8, 9, 10, 11]
    out = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(max_tokens=1, prompt_logprobs=2),
        use_tqdm=False,
    )[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        assert abs(lps[p][ids[p]].logprob - ref[p - 1, ids[p]].item()) < 1e-4


def test_prefix_cache_computes_only_new_tokens(tiny_model_dir):
    llm = LLM(tiny_model_dir, block_size=4)
    engine = llm.llm_engine
    prefix = list(range(10, 50))  # 40 tokens = 10 full blocks
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prefix + [60, 61]}, params, use_tqdm=False)[0]
    before = engine.prompt_tokens_total
    second = llm.generate({"prompt_token_ids": prefix + [70, 71, 72]}, params, use_tqdm=False)[0]
    computed = engine.prompt_tokens_total - before
    assert second.num_cached_tokens == 40
    assert computed == 3  # only the new tokens
    assert first.outputs[0].token_ids  # both generated
    # The same prompt again gives the same tokens from the cache as it did computed.
    again = llm.generate({"prompt_token_ids": prefix + [60, 61]}, params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_batch_and_list_forms(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    one = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(one) == 1 and len(one[0].outputs[0].token_ids) == 3
    many = llm.generate(
        ["a", "b"],
        [
            SamplingParams(max_tokens=2, ignore_eos=True),
            SamplingParams(max_tokens=4, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in many] == [2, 4]
    assert many[0].prompt == "a" and many[0].request_id != many[1].request_id
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_chat_uses_the_template(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    msgs = [{"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.encode(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert out.prompt_token_ids == expected
    two = llm.chat([msgs, msgs], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(two) == 2


def test_n_samples_share_prompt_blocks(tiny_model_dir):
    llm = LLM(tiny_model_dir, block_size=4, seed=1)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    out = llm.generate({"prompt_token_ids": list(range(5, 19))}, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    engine = llm.llm_engine
    # Only one prompt's worth of prompt tokens was computed for the four samples.
    assert engine.prompt_tokens_total == 14
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    # Greedy n=2 gives two identical samples.
    g = llm.generate("Hello", SamplingParams(n=2, temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids


def test_stops_on_eos_and_stop_token_ids(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    ref = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    toks = ref[0].outputs[0].token_ids
    stop_at = toks[3]
    out = llm.generate(
        "Hello",
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == toks[: toks.index(stop_at) + 1]


def test_abort_frees_blocks(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    engine = llm.llm_engine
    engine.add_request("a", "Hello world", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", "The sky", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    outs = engine.abort_request(["a", "b", "unknown"])
    assert [o.outputs[0].finish_reason for o in outs] == ["abort", "abort"]
    assert all(o.finished for o in outs)
    stats = engine.get_stats()
    assert not engine.has_unfinished_requests()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_progress_bar_on_a_batch_unless_use_tqdm_false(tiny_model_dir, capsys):
    llm = LLM(tiny_model_dir)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    capsys.readouterr()
    assert len(llm.generate(PROMPTS, params)) == len(PROMPTS)  # use_tqdm defaults to True
    err = capsys.readouterr().err
    assert "Generating" in err and f"{len(PROMPTS)}/{len(PROMPTS)}" in err, err
    llm.chat([[{"role": "user", "content": "Hi"}]] * 2, params)  # chat batches too
    assert "2/2" in capsys.readouterr().err
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert capsys.readouterr().err == ""
    llm.generate("Hello", params)  # a single prompt gets no bar
    assert capsys.readouterr().err == ""


def test_kv_cache_memory_sizes_the_cache(tiny_model_dir):
    from asyncllm.engine.model_runner import kv_bytes_per_block

    def cache_of(kv_cache_memory: int) -> tuple[LLM, int]:
        llm = LLM(tiny_model_dir, block_size=4, kv_cache_memory=kv_cache_memory)
        mc = llm.llm_engine.model_config
        return llm, kv_bytes_per_block(mc.hf_config, 4, mc.dtype)

    llm, per_block = cache_of(3 * 1024**2)
    assert per_block > 0
    blocks = llm.llm_engine.get_stats().kv_blocks_total
    assert blocks == 3 * 1024**2 // per_block
    # what is allocated is what was asked for, rounded down to whole blocks
    allocated = sum(c.numel() * c.element_size() for c in llm.llm_engine.runner.kv_caches)
    assert allocated == blocks * per_block <= 3 * 1024**2

    llm, _ = cache_of(7 * per_block + per_block - 1)
    assert llm.llm_engine.get_stats().kv_blocks_total == 7
    # 7 blocks of 4 tokens hold 28 tokens: a 41-token request cannot fit, and is refused up front
    with pytest.raises(ValueError, match="needs up to 11 KV blocks but the cache has 7"):
        llm.generate(
            {"prompt_token_ids": list(range(10, 50))}, SamplingParams(max_tokens=1), use_tqdm=False
        )
    out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3  # and the engine goes on
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total == 7


def test_user_errors_are_value_errors(tiny_model_dir, tmp_path):
    llm = LLM(tiny_model_dir, max_model_len=32)
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [1] * 40}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**7]}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    engine.add_request("dup", "hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "hi", SamplingParams(max_tokens=2))
    engine.abort_request("dup")
    with pytest.raises(ValueError):
        LLM(str(tmp_path / "does-not-exist"))
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and not engine.has_unfinished_requests()


def test_unknown_architecture_is_a_clear_error(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "weird"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(d))


def test_max_model_len_ends_with_length(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_model_len=16)
    out = llm.generate(
        {"prompt_token_ids": list(range(5, 15))},
        SamplingParams(max_tokens=100, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6


@pytest.mark.slow
def test_default_model_answers_paris():
    llm = LLM()
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )[0]
    assert "Paris" in out.outputs[0].text


def test_prompt_logprobs_once_after_preemption_in_mid_prefill(tiny_model_dir):
    """Six 40-token prompts through 16 blocks of 4 tokens, 8 tokens a step: prompts are
    preempted half-prefilled and computed again; each position's logprobs appear once."""
    llm = LLM(tiny_model_dir, block_size=4, num_kv_blocks=16, max_num_batched_tokens=8)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 300 + 3 for j in range(40)]} for i in range(6)]
    params = SamplingParams(max_tokens=16, prompt_logprobs=1, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    single = LLM(tiny_model_dir, block_size=4)
    for p, out in zip(prompts, outs, strict=True):
        assert len(out.prompt_logprobs) == 40
        assert out.prompt_logprobs[0] is None
        (ref,) = single.generate(p, params, use_tqdm=False)
        for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_n_above_max_num_seqs_is_refused(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_num_seqs=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate("Hello", SamplingParams(n=3, max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # the engine is not held up: the next request runs
    (out,) = llm.generate("Hello", SamplingParams(n=2, max_tokens=2), use_tqdm=False)
    assert len(out.outputs) == 2


def test_model_as_a_path(tiny_model_dir):
    from pathlib import Path

    llm = LLM(Path(tiny_model_dir))
    (out,) = llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2


def test_generation_config_eos_ids_and_defaults(tiny_model_dir, tmp_path):
    """generation_config.json as vLLM's --generation-config auto reads it: its EOS ids end
    generation, its sampling values are the defaults, a request's own params win."""
    import json
    import shutil

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (ref,) = LLM(tiny_model_dir).generate("Hello world", greedy, use_tqdm=False)
    toks = ref.outputs[0].token_ids
    d = tmp_path / "with_generation_config"
    shutil.copytree(tiny_model_dir, d)
    eos = json.loads((d / "config.json").read_text())["eos_token_id"]
    assert eos not in toks
    stop_at = next(i for i, t in enumerate(toks) if i >= 3 and t not in toks[:i])
    (d / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [eos, toks[stop_at]], "temperature": 0.0, "max_new_tokens": 8})
    )
    llm = LLM(str(d))
    (out,) = llm.generate("Hello world", use_tqdm=False)  # no params: the file's defaults
    assert out.outputs[0].token_ids == toks[: stop_at + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert llm.get_default_sampling_params().temperature == 0.0
    # the request's values win over the file's (temperature 0 again, max_tokens 2)
    (out,) = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=2))
    assert out.outputs[0].token_ids == toks[:2]
    # "vllm": the file's sampling values are not used, its EOS ids still are
    plain = LLM(str(d), generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    (out,) = plain.generate("Hello world", SamplingParams(temperature=0, max_tokens=8))
    assert out.outputs[0].token_ids == toks[: stop_at + 1]
    assert out.outputs[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def longrope_dir(tmp_path_factory) -> str:
    from tests.tiny_models import build_model

    return str(build_model("phi3_longrope", tmp_path_factory.mktemp("phi3_longrope")))


@pytest.fixture(scope="module")
def longrope_cases(longrope_dir) -> list[tuple[int, list[list[int]], list[list[int]]]]:
    """(max_model_len, prompt ids, transformers' tokens) for both longrope regimes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(longrope_dir)
    long_prompts = [" ".join([p] * 14) for p in PROMPTS[:3]]
    cases = []
    for max_len, prompts in ((64, PROMPTS), (512, long_prompts)):
        ids = [tok.encode(p) for p in prompts]
        assert all((len(i) + MAX_NEW <= 64) == (max_len == 64) for i in ids)
        assert max_len == 64 or all(len(i) > 64 for i in ids)
        cases.append((max_len, ids, [hf_greedy(longrope_dir, i, MAX_NEW) for i in ids]))
    return cases


@pytest.mark.parametrize("config", list(CONFIGS))
def test_longrope_phi3_matches_transformers(longrope_dir, longrope_cases, config):
    """Longrope: transformers rotates with the short factors while a sequence fits the original
    context (64 here) and the long ones beyond; our table picks one set by max_model_len. Both
    regimes: max_model_len 64 with short prompts, 512 with prompts past 64 tokens."""
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for max_len, ids, want in longrope_cases:
        if config == "preempting" and max_len == 512:
            continue  # three long prompts in chunks of 8 run one at a time: nothing to preempt
        kwargs = dict(CONFIGS[config], max_model_len=max_len)
        if config == "preempting":
            # window 5: in chunks of 8 a sequence holds at most 4 blocks; 6 run short
            kwargs.update(num_kv_blocks=6, max_num_batched_tokens=8)
        llm = LLM(longrope_dir, **kwargs)
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        if config == "preempting":
            assert llm.llm_engine.get_stats().num_preemptions > 0
