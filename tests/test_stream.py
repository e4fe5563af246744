"""The per-request coalescing stream: merging RequestOutputs per output kind, bounded buffering."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncllm.engine.stream import RequestStream, merge_outputs
from asyncllm.outputs import CompletionOutput, Logprob, RequestOutput
from asyncllm.sampling_params import RequestOutputKind

DELTA = RequestOutputKind.DELTA
CUMULATIVE = RequestOutputKind.CUMULATIVE
FINAL_ONLY = RequestOutputKind.FINAL_ONLY


def _out(
    comps: list[CompletionOutput], finished: bool = False, prompt_logprobs=None
) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2, 3], comps, finished, prompt_logprobs=prompt_logprobs)


def _comp(index: int, text: str, ids: list[int], cum: float = 0.0, finish=None, lps=None):
    return CompletionOutput(index, text, ids, cum, lps, finish, None)


def test_merge_delta_concatenates_per_index():
    lp = [{5: Logprob(-0.5, 1)}]
    a = _out([_comp(0, "he", [5], -0.5, lps=lp), _comp(1, "x", [9], -1.0, lps=lp)], False, [None])
    b = _out([_comp(1, "yz", [7, 8], -3.0, lps=lp * 2)])
    c = _out([_comp(0, "llo", [6, 6], -2.0, "length", lps=lp * 2)], finished=True)
    m = merge_outputs(merge_outputs(a, b, DELTA), c, DELTA)
    assert m.finished
    assert [o.index for o in m.outputs] == [0, 1]
    o0, o1 = m.outputs
    assert (o0.text, o0.token_ids, o0.cumulative_logprob, o0.finish_reason) == (
        "hello",
        [5, 6, 6],
        -2.0,
        "length",
    )
    assert len(o0.logprobs) == 3
    assert (o1.text, o1.token_ids, o1.cumulative_logprob, o1.finish_reason) == (
        "xyz",
        [9, 7, 8],
        -3.0,
        None,
    )
    assert len(o1.logprobs) == 3
    assert m.prompt_logprobs == [None]  # sent once, on the first delta; kept through merges


def test_merge_cumulative_and_final_only_keep_newest():
    a = _out([_comp(0, "he", [5]), _comp(1, "x", [9])])
    b = _out([_comp(0, "hello", [5, 6]), _comp(1, "xy", [9, 7])], finished=True)
    for kind in (CUMULATIVE, FINAL_ONLY):
        m = merge_outputs(a, b, kind)
        assert [(o.index, o.text, o.token_ids) for o in m.outputs] == [
            (0, "hello", [5, 6]),
            (1, "xy", [9, 7]),
        ]
        assert m.finished


def test_merge_does_not_mutate_inputs():
    a = _out([_comp(0, "a", [1])])
    b = _out([_comp(0, "b", [2])])
    merge_outputs(a, b, DELTA)
    assert (a.outputs[0].text, a.outputs[0].token_ids) == ("a", [1])
    assert (b.outputs[0].text, b.outputs[0].token_ids) == ("b", [2])


# A request's DELTA outputs: a list of steps, each step new (index, text-piece) for some indexes.
_steps = st.lists(
    st.lists(st.tuples(st.integers(0, 2), st.text(max_size=3)), min_size=1, max_size=3),
    min_size=1,
    max_size=12,
)


@given(_steps, st.data())
def test_merge_delta_any_grouping_joins_to_the_whole(steps, data):
    """However a slow reader's outputs get grouped, per index the joined deltas are the same."""
    outs = []
    for step in steps:
        by_index: dict[int, str] = {}
        for i, t in step:
            by_index[i] = by_index.get(i, "") + t
        outs.append(_out([_comp(i, t, [len(t)]) for i, t in sorted(by_index.items())]))
    expected: dict[int, tuple[str, list[int]]] = {}
    for o in outs:
        for c in o.outputs:
            text, ids = expected.get(c.index, ("", []))
            expected[c.index] = (text + c.text, ids + c.token_ids)

    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(outs)), max_size=len(outs)))))
    groups, start = [], 0
    for cut in [*cuts, len(outs)]:
        if cut > start:
            groups.append(outs[start:cut])
            start = cut
    got: dict[int, tuple[str, list[int]]] = {}
    for group in groups:
        merged = group[0]
        for o in group[1:]:
            merged = merge_outputs(merged, o, DELTA)
        assert [c.index for c in merged.outputs] == sorted({c.index for c in merged.outputs})
        for c in merged.outputs:
            text, ids = got.get(c.index, ("", []))
            got[c.index] = (text + c.text, ids + c.token_ids)
    assert got == expected


@pytest.mark.anyio
async def test_stream_holds_one_pending_output_for_a_slow_reader():
    s = RequestStream("r", DELTA)
    for k in range(1000):
        s.put(_out([_comp(0, "ab", [k])]))
    # One merged output however many came in: memory is bounded by the request, not the lag.
    assert s.has_pending and s.num_puts == 1000 and s.num_merges == 999
    got = await s.get()
    assert got.outputs[0].text == "ab" * 1000 and got.outputs[0].token_ids == list(range(1000))
    assert not s.has_pending
    s.put(_out([_comp(0, "!", [7], finish="stop")], finished=True))
    last = await s.get()
    assert last.finished and last.outputs[0].finish_reason == "stop"
    with pytest.raises(StopAsyncIteration):
        await s.get()
    s.put(_out([_comp(0, "late", [1])]))  # nothing after the end
    assert not s.has_pending


@pytest.mark.anyio
async def test_stream_wakes_a_waiting_reader_and_raises_errors_after_pending_output():
    s = RequestStream("r", DELTA)
    got: list[str] = []

    async def reader() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async for out in s:
                got.append(out.outputs[0].text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.01)
        s.put(_out([_comp(0, "a", [1])]))
        await anyio.sleep(0.01)
        s.put(_out([_comp(0, "b", [2])]))
        s.put_error(RuntimeError("boom"))  # after "b": the reader gets "b" first, then the error
        with anyio.fail_after(2):
            await s.wait_finished()
    assert got == ["a", "b"]


@pytest.mark.anyio
async def test_detached_stream_keeps_nothing_but_tracks_the_end():
    s = RequestStream("r", CUMULATIVE)
    s.detached = True
    s.put(_out([_comp(0, "abc", [1, 2, 3])]))
    assert not s.has_pending and not s.finished
    s.put(_out([_comp(0, "abcd", [1, 2, 3, 4], finish="abort")], finished=True))
    assert s.finished and not s.has_pending
    with anyio.fail_after(1):
        await s.wait_finished()
