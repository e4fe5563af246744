"""Constrained decoding (xgrammar) in the engine: every constraint kind holds on a random tiny
model at temperature 1.0 (which, unconstrained, produces noise), in the synchronous and the async
order, through n > 1 and mixed batches; compiled grammars are cached; bad constraints are
ValueErrors; the bitmask's batched application matches a per-row reference."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.engine.grammar import StepBitmask, apply_bitmask, bitmask_width
from asyncllm.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def _params(so: StructuredOutputsParams, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 80)
    return SamplingParams(temperature=1.0, seed=kw.pop("seed", 1), structured_outputs=so, **kw)


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    return {
        mode: LLM(tiny_model_dir, async_scheduling=mode, max_model_len=256)
        for mode in (False, True)
    }


@pytest.mark.parametrize("async_mode", [False, True])
def test_every_constraint_kind_holds_at_temperature_one(llms, async_mode):
    llm = llms[async_mode]
    prompts = ["Hello world", "The answer is", "JSON:", "Pick one"]
    params = [
        _params(StructuredOutputsParams(json=SCHEMA), seed=1),
        _params(StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), seed=2),
        _params(StructuredOutputsParams(choice=["yes", "no", "maybe"]), seed=3),
        _params(StructuredOutputsParams(grammar='root ::= "x" ("ab" | "cd")+ "!"'), seed=4),
        # an unconstrained row in the same batch is left alone
        SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
    ]
    outs = llm.generate([*prompts, "free"], params, use_tqdm=False)
    texts = [o.outputs[0] for o in outs]
    jsonschema.validate(json.loads(texts[0].text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", texts[1].text)
    assert texts[2].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"x(ab|cd)+!", texts[3].text)
    for c in texts[:4]:
        assert c.finish_reason == "stop"  # the finished grammar ended the request
    assert texts[4].finish_reason == "length" and len(texts[4].token_ids) == 6
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_async_order_gives_the_synchronous_tokens(llms):
    got = {}
    for mode, llm in llms.items():
        ps = [_params(StructuredOutputsParams(json=SCHEMA), seed=s) for s in range(3)]
        ps.append(_params(StructuredOutputsParams(json_object=True), seed=9, max_tokens=30))
        outs = llm.generate(["a", "b c", "d e f", "g"], ps, use_tqdm=False)
        got[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    assert got[True] == got[False]


def test_constraints_survive_preemption_and_chunked_prefill(tiny_model_dir):
    """Recompute keeps the generated tokens, so each matcher stays where it was."""
    llm = LLM(
        tiny_model_dir, max_model_len=256, num_kv_blocks=24, block_size=4, max_num_batched_tokens=8
    )
    ps = [_params(StructuredOutputsParams(json=SCHEMA), seed=s) for s in range(6)]
    outs = llm.generate([f"prompt number {i} here" for i in range(6)], ps, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_json_object_and_n_greater_than_one(llms):
    llm = llms[False]
    so = StructuredOutputsParams(json_object=True)
    out = llm.generate(["x"], _params(so, n=3, max_tokens=40, seed=7), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # a random model may ramble inside a string until max_tokens
            assert c.finish_reason == "length" and c.text.startswith("{")


def test_grammar_compiled_once_per_constraint(llms):
    engine = llms[False].llm_engine
    so = StructuredOutputsParams(regex=r"[a-c]{5}")
    llms[False].generate(["p"], _params(so), use_tqdm=False)
    before = engine.grammar.num_compiled
    outs = llms[False].generate(["p", "q"], [_params(so), _params(so, seed=3)], use_tqdm=False)
    assert engine.grammar.num_compiled == before
    assert all(re.fullmatch(r"[a-c]{5}", o.outputs[0].text) for o in outs)


def test_bad_constraints_are_value_errors(llms):
    engine = llms[False].llm_engine
    with pytest.raises(ValueError, match="invalid structured_outputs json"):
        engine.add_request("bad1", "x", _params(StructuredOutputsParams(json={"type": "nope"})))
    with pytest.raises(ValueError, match="invalid structured_outputs grammar"):
        engine.add_request("bad2", "x", _params(StructuredOutputsParams(grammar="root ::= (")))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    sp = SamplingParams(structured_outputs={"regex": "a+"})  # a dict is converted
    assert sp.structured_outputs == StructuredOutputsParams(regex="a+")


def test_unconstrained_requests_build_no_grammar(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    llm.generate(["hi"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.llm_engine._grammar is None


def test_apply_bitmask_matches_a_per_row_reference():
    torch.manual_seed(0)
    n, vocab = 5, 70  # not a multiple of 32: the mask's last word is padding
    logits = torch.randn(n, vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (n, bitmask_width(vocab)), dtype=torch.int32)
    rows = [0, 3, 4]
    want = logits.clone()
    for r in rows:
        for t in range(vocab):
            if not (int(mask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, StepBitmask(mask, rows))
    assert torch.equal(got, want)


def test_apply_bitmask_sparse_rows_match_the_reference():
    """Rows that allow only a few tokens take the CPU's sparse path (keep, fill, put back); mixed
    with dense rows, padding bits set in the last word, a row left out of the indices."""
    torch.manual_seed(1)
    n, vocab = 6, 32 * 40 + 5
    logits = torch.randn(n, vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (n, bitmask_width(vocab)), dtype=torch.int32)
    for r in (1, 2, 5):  # sparse: a handful of allowed tokens, one of them the last
        mask[r] = 0
        for t in (0, 33, 34, 700, vocab - 1):
            mask[r, t // 32] |= 1 << (t % 32) if t % 32 != 31 else -(2**31)
        mask[r, -1] |= -(2**31)  # a padding bit beyond the vocabulary
    mask[3] = 0  # nothing allowed at all
    rows = [0, 1, 2, 3, 5]
    want = logits.clone()
    for r in rows:
        for t in range(vocab):
            if not (int(mask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, StepBitmask(mask, rows))
    assert torch.equal(got, want)
    assert torch.equal(got[4], logits[4])
    assert int(torch.isfinite(got[1]).sum()) == 5


def test_bounded_json_strings_refuse_control_characters(llms):
    """xgrammar's own grammar for a maxLength string lets raw control bytes in; ours does not."""
    backend = llms[False].llm_engine.grammar
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}}
    m = backend.matcher(backend.compile(StructuredOutputsParams(json=schema)))
    assert m.accept_string('{"a": "x')
    assert not m.accept_string("\x06")
    assert m.accept_string('y"}')


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@_needs_cuda
def test_gpu_apply_bitmask_matches_the_cpu():
    torch.manual_seed(0)
    n, vocab = 64, 49152 + 17
    logits = torch.randn(n, vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (n, bitmask_width(vocab)), dtype=torch.int32)
    for rows in (list(range(n)), list(range(0, n, 3))):
        want = logits.clone()
        apply_bitmask(want, StepBitmask(mask, rows))
        got = logits.cuda()
        apply_bitmask(got, StepBitmask(mask, rows))
        assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@_needs_cuda
def test_gpu_constraints_hold_with_async_scheduling_and_cuda_graphs(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cuda", max_model_len=256)
    assert llm.llm_engine.async_scheduling
    params = [_params(StructuredOutputsParams(json=SCHEMA), seed=s) for s in range(6)]
    params.append(SamplingParams(temperature=1.0, seed=9, max_tokens=8, ignore_eos=True))
    outs = llm.generate([f"p{i}" for i in range(7)], params, use_tqdm=False)
    for o in outs[:6]:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    assert len(outs[6].outputs[0].token_ids) == 8


def test_fill_threads_rule_and_override(monkeypatch):
    from asyncllm.engine.grammar import fill_threads

    monkeypatch.delenv("ASYNCLLM_GRAMMAR_THREADS", raising=False)
    assert fill_threads(7) == 1
    assert 1 <= fill_threads(512) <= 8
    monkeypatch.setenv("ASYNCLLM_GRAMMAR_THREADS", "3")
    assert fill_threads(64) == 3
    monkeypatch.setenv("ASYNCLLM_GRAMMAR_THREADS", "0")
    with pytest.raises(ValueError, match="GRAMMAR_THREADS"):
        fill_threads(64)


def test_fill_thread_chooser_follows_measured_cost(monkeypatch):
    """One thread when its fills are faster per row, the rule's count when those are, and both
    probed again every probe_every fills (rows move between structure and strings)."""
    from asyncllm.engine import grammar

    monkeypatch.delenv("ASYNCLLM_GRAMMAR_THREADS", raising=False)
    monkeypatch.setattr(grammar.os, "sched_getaffinity", lambda pid: set(range(16)))
    many = grammar.fill_threads(64)
    assert many == 8
    ch = grammar.FillThreadChooser(probe_every=16)
    cost = {1: 2e-6, many: 8e-6}  # structure rows: one thread is faster

    def run(n: int) -> list[int]:
        picks = []
        for _ in range(n):
            t = ch.pick(64)
            ch.record(t, 64, cost[t] * 64)
            picks.append(t)
        return picks

    picks = run(48)
    assert set(picks[:2]) == {1, many}  # the first fills probe both
    assert picks[16:].count(1) >= 44 - 16  # then one thread, bar the probes
    cost.update({1: 10e-6, many: 3e-6})  # the rows entered strings: threads pay
    picks = run(64)
    assert picks[-16:].count(many) >= 14
    # forced by the env: no choice
    monkeypatch.setenv("ASYNCLLM_GRAMMAR_THREADS", "4")
    assert {ch.pick(64) for _ in range(40)} == {4}
    # too few rows for threads: always one
    monkeypatch.delenv("ASYNCLLM_GRAMMAR_THREADS")
    assert {ch.pick(7) for _ in range(40)} == {1}


def test_threaded_fill_equals_single_thread(llms, monkeypatch):
    """Every thread count fills the same mask (rows past the threshold use several threads)."""
    backend = llms[False].llm_engine.grammar
    compiled = backend.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [backend.matcher(compiled) for _ in range(6)]
    for m, prefix in zip(matchers, ["", "{", '{"name": "a', '{"name": "ab"', "{", ""], strict=True):
        assert m.accept_string(prefix) or not prefix
    idx = [0, 2, 3, 5, 7, 8]
    masks = []
    for t in ("1", "2"):
        monkeypatch.setenv("ASYNCLLM_GRAMMAR_THREADS", t)
        masks.append(backend.fill(9, matchers, idx).mask[idx].clone())
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0][0], masks[0][1])  # different states, different masks


@pytest.mark.gpu
@_needs_cuda
def test_gpu_pinned_fill_alternates_buffers_and_matches_the_cpu(tiny_model_dir):
    """A GPU engine fills into two pinned buffers in turn; applying either equals the CPU path.
    (No LLM here: the module's CPU engines would take the GPU's memory on a CUDA machine.)"""
    from asyncllm.engine.grammar import GrammarBackend
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(tiny_model_dir))
    vocab = len(tok)
    g = GrammarBackend(tok, vocab, [tok.eos_token_id], pinned=True)
    compiled = g.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [g.matcher(compiled) for _ in range(4)]
    matchers[1].accept_string("{")
    a = g.fill(6, matchers, [0, 1, 3, 4])
    b = g.fill(6, matchers, [0, 1, 3, 4])
    assert a.mask.is_pinned() and b.mask.is_pinned()
    assert a.mask.data_ptr() != b.mask.data_ptr()
    assert a.pinned_indices is not None and a.pinned_indices.tolist() == [0, 1, 3, 4]
    logits = torch.randn(6, vocab)
    want = logits.clone()
    apply_bitmask(want, StepBitmask(a.mask.clone(), [0, 1, 3, 4]))
    got = logits.cuda()
    apply_bitmask(got, a)
    assert torch.equal(got.cpu(), want)


def test_forward_is_queued_before_the_fill_and_the_fill_runs_beside_the_resolve(llms, monkeypatch):
    _check_constrained_step_order(llms[True], monkeypatch)


@pytest.mark.gpu
@_needs_cuda
def test_gpu_forward_is_queued_before_the_fill(tiny_model_dir, monkeypatch):
    import gc

    gc.collect()  # an earlier test's engine still holding the GPU's memory
    torch.cuda.empty_cache()
    llm = LLM(tiny_model_dir, device="cuda", max_model_len=256, gpu_memory_utilization=0.3)
    try:
        _check_constrained_step_order(llm, monkeypatch)
    finally:
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()


def _check_constrained_step_order(llm, monkeypatch) -> None:
    """The async order of a constrained step: forward N+1 is queued, step N's ids are synced and
    accepted by the matchers, N+1's mask is filled on the worker thread while N's tokens go
    through the host's per-token work, and only then is N+1 sampled with it."""
    import threading

    from asyncllm.engine import sampler as sampler_mod
    from asyncllm.engine.grammar import PendingFill

    engine = llm.llm_engine
    # the worker is opt-in (ASYNCLLM_GRAMMAR_OVERLAP); this checks its order when it is on
    monkeypatch.setattr(engine, "_grammar_overlap", True)
    assert engine.async_scheduling
    g = engine.grammar
    log: list[str] = []

    def spy(name, fn, label=None):
        def wrapped(*a, **kw):
            log.append(label(a) if label else name)
            return fn(*a, **kw)

        return wrapped

    ex = engine.executor
    monkeypatch.setattr(ex, "execute", spy("forward", ex.execute))
    result = sampler_mod.PendingSample.result
    monkeypatch.setattr(
        sampler_mod.PendingSample, "result", lambda self: (log.append("sync"), result(self))[1]
    )
    monkeypatch.setattr(g, "accept", spy("accept", g.accept))
    monkeypatch.setattr(g, "fill_async", spy("fill_start", g.fill_async))
    run = PendingFill._run  # the xgrammar call, on the worker
    monkeypatch.setattr(
        PendingFill,
        "_run",
        lambda self: (log.append(f"fill@{threading.current_thread().name}"), run(self))[1],
    )
    join = PendingFill.join
    monkeypatch.setattr(PendingFill, "join", lambda self: (log.append("join"), join(self))[1])
    monkeypatch.setattr(engine, "_append_token", spy("token", engine._append_token))
    launch = engine.sampler.launch
    monkeypatch.setattr(
        engine.sampler,
        "launch",
        lambda lg, rows, bm=None: (
            log.append("sample+mask" if bm else "sample"),
            launch(lg, rows, bm),
        )[1],
    )

    ps = [_params(StructuredOutputsParams(json=SCHEMA), seed=s, max_tokens=12) for s in (1, 2)]
    outs = llm.generate(["a b", "c"], ps, use_tqdm=False)
    assert all(o.outputs[0].text.startswith("{") for o in outs)

    overlapped = 0
    for i, ev in enumerate(log):
        if ev != "fill_start":
            continue
        start = max(k for k in range(i) if log[k] == "forward")
        seg = log[start : log.index("sample+mask", i) + 1]
        # forward N+1, then N's sync and accept, then N+1's fill, then its sampling
        assert (
            seg.index("forward") < seg.index("sync") < seg.index("accept") < seg.index("fill_start")
        )
        mid = seg[seg.index("fill_start") : seg.index("join")]
        assert "token" in mid  # step N's per-token work ran while the mask was filled
        assert "fill@asyncllm-grammar-fill" in seg  # on the worker thread
        assert seg.index("join") < seg.index("sample+mask")
        overlapped += 1
    assert overlapped >= 5


def test_overlap_off_gives_the_same_tokens(tiny_model_dir, llms, monkeypatch):
    """ASYNCLLM_GRAMMAR_OVERLAP=0 fills on the engine's thread: same tokens as the worker."""
    monkeypatch.setenv("ASYNCLLM_GRAMMAR_OVERLAP", "0")
    off = LLM(tiny_model_dir, async_scheduling=True, max_model_len=256)
    assert not off.llm_engine._grammar_overlap
    got = []
    for llm in (off, llms[True]):
        ps = [_params(StructuredOutputsParams(json=SCHEMA), seed=s) for s in range(3)]
        ps.append(SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))
        outs = llm.generate(["a", "b c", "d e f", "free"], ps, use_tqdm=False)
        got.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
    assert got[0] == got[1]
    assert off.llm_engine._grammar._worker is None  # the thread is never started


@pytest.mark.parametrize("async_mode", [False, True])
def test_a_complete_grammar_ends_the_request_under_ignore_eos(llms, async_mode):
    """With ignore_eos the EOS rule stops nothing: the matcher's termination (it accepted the
    stop token) must end the request."""
    so = StructuredOutputsParams(choice=["yes", "no"])
    outs = llms[async_mode].generate(
        ["p", "q", "r"],
        [_params(so, seed=s, ignore_eos=True, max_tokens=20) for s in range(3)],
        use_tqdm=False,
    )
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].text in ("yes", "no")


def test_accept_reports_each_matchers_outcome(llms):
    from asyncllm.engine.grammar import ACCEPTED, REJECTED, TERMINATED

    backend = llms[False].llm_engine.grammar
    tok = llms[False].llm_engine.tokenizer
    compiled = backend.compile(StructuredOutputsParams(regex="ab"))
    eos = tok.eos_token_id
    ms = [backend.matcher(compiled) for _ in range(3)]
    a = tok.encode("a", add_special_tokens=False)
    assert len(a) == 1
    assert ms[1].accept_string("ab") and ms[2].accept_string("ab")
    states = backend.accept(ms, [a[0], eos, a[0]])
    # row 0 may go on; row 1 took the stop token of a complete match; row 2 has nothing left
    assert states == [ACCEPTED, TERMINATED, REJECTED]
    assert ms[1].is_terminated() and not ms[0].is_terminated()
    assert backend.accept(ms[:1], [eos]) == [REJECTED]  # "a" alone is not a match


def test_fill_async_equals_fill_and_hands_errors_back(llms):
    import sys

    backend = llms[False].llm_engine.grammar
    compiled = backend.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [backend.matcher(compiled) for _ in range(3)]
    matchers[1].accept_string('{"name": "a')
    interval = sys.getswitchinterval()
    want = backend.fill(5, matchers, [0, 2, 4])
    got = backend.fill_async(5, matchers, [0, 2, 4]).result()
    assert got.all_rows is False and want.all_rows is False
    assert torch.equal(got.mask[[0, 2, 4]], want.mask[[0, 2, 4]])
    assert sys.getswitchinterval() == interval  # restored once joined
    bad = backend.fill_async(2, matchers, [0, 1, 9])  # row 9 of a 2-row mask
    with pytest.raises(Exception):  # noqa: B017 (xgrammar's own error type)
        bad.result()
    assert sys.getswitchinterval() == interval
    full = backend.fill(3, matchers, [0, 1, 2])
    assert full.all_rows is True
