"""AsyncLLMEngine with the engine loop in a child process (EngineArgs.engine_process): the same
outputs as LLM.generate, aborts that free every block, bad input, sinks, shutdown, and the child
dying under open streams. Every async test runs under asyncio and trio."""

from __future__ import annotations

import anyio
import pytest

from asyncllm import LLM, AsyncLLMEngine, EngineArgs, EngineDeadError, SamplingParams
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import RequestOutputKind

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time there was a little model that could",
    "Café, naïve, résumé",
    "日本語のテキスト",
]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.DELTA, **kw
    )


@pytest.fixture(scope="module")
def refs(tiny_model_dir) -> dict[str, RequestOutput]:
    llm = LLM(tiny_model_dir)
    outs = llm.generate(PROMPTS, greedy(20), use_tqdm=False)
    return dict(zip(PROMPTS, outs, strict=True))


def _args(path: str) -> EngineArgs:
    return EngineArgs(model=path, engine_process=True, num_kv_blocks=128, block_size=4)


async def _settle(eng: AsyncLLMEngine) -> None:
    with anyio.fail_after(20):
        while eng.num_unfinished_requests:
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_process_engine_streams_abort_errors_sink_and_shutdown(tiny_model_dir, refs):
    eng = AsyncLLMEngine.from_engine_args(_args(tiny_model_dir))
    async with eng:
        assert eng._transport.proc is not None and eng._transport.proc.proc.is_alive()
        assert eng.model_config.max_model_len == 512 and eng.tokenizer is not None
        got: dict[str, tuple[list[int], str]] = {}

        async def one(p: str) -> None:
            ids, text = [], ""
            async for out in eng.generate(p, greedy(20)):
                assert out.prompt_token_ids == eng.tokenizer.encode(p)  # restored here
                ids += out.outputs[0].token_ids
                text += out.outputs[0].text
            got[p] = (ids, text)

        async with anyio.create_task_group() as tg:
            for _ in range(3):  # 15 concurrent streams
                for p in PROMPTS:
                    tg.start_soon(one, p)
        for p in PROMPTS:
            assert got[p] == (refs[p].outputs[0].token_ids, refs[p].outputs[0].text)

        # Abort mid-stream: the child frees the blocks and confirms.
        outs = []
        async for out in eng.generate(PROMPTS[2], greedy(400), request_id="a"):
            outs.append(out)
            if len(outs) == 2:
                await eng.abort("a")
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        await _settle(eng)
        stats = eng.stats()
        assert stats.num_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total

        # Bad input fails that request only.
        with pytest.raises(ValueError, match="vocabulary"):
            async for _ in eng.generate({"prompt_token_ids": [10**6]}, greedy(3)):
                pass

        # chat() and a sink.
        seen: list[RequestOutput] = []
        it = eng.chat([{"role": "user", "content": "Hi"}], greedy(5), sink=None)
        chat_ids = [t async for out in it for t in out.outputs[0].token_ids]
        assert len(chat_ids) == 5
        async for _ in eng.generate(PROMPTS[0], greedy(20), sink=seen.append):
            pass
        assert [t for o in seen for t in o.outputs[0].token_ids] == (
            refs[PROMPTS[0]].outputs[0].token_ids
        )

        # Leaving early aborts in the child too.
        async for _ in eng.generate(PROMPTS[1], greedy(300)):
            break
        await _settle(eng)
        assert eng.stats().kv_blocks_free == eng.stats().kv_blocks_total
        proc = eng._transport.proc.proc
    assert not proc.is_alive() and proc.exitcode == 0  # shut down cleanly with the block
    await eng.shutdown()  # idempotent


@pytest.mark.anyio
async def test_a_dead_engine_process_ends_every_stream(tiny_model_dir):
    eng = AsyncLLMEngine.from_engine_args(_args(tiny_model_dir))
    async with eng:
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                async for out in eng.generate(PROMPTS[i % 5], greedy(100_000)):
                    if out.outputs[0].token_ids and i == 0:
                        eng._transport.proc.proc.kill()  # the child dies mid-run, without a word
            except EngineDeadError as e:
                errors.append(e)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
        assert len(errors) == 4 and eng.errored
        assert "engine process" in str(errors[0])
        with pytest.raises(EngineDeadError):
            eng.generate("Hello", greedy(2))


@pytest.mark.anyio
async def test_a_process_engine_that_cannot_load_raises_the_childs_error(tmp_path):
    eng = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(tmp_path / "nope"), engine_process=True)
    )
    with pytest.raises(ValueError):
        await eng.start()


def test_pack_unpack_round_trip():
    from asyncllm.engine.engine_process import pack, unpack
    from asyncllm.outputs import CompletionOutput, Logprob, RequestMetrics

    out = RequestOutput(
        "r",
        "Hi",
        [1, 2, 3],
        [
            CompletionOutput(0, "a", [5], -0.5, [{5: Logprob(-0.5, 1, "a")}], None, None),
            CompletionOutput(1, "b", [6, 7], -1.0, None, "stop", "</s>"),
        ],
        False,
        [None, {2: Logprob(-1.0, 2, "x")}],
        3,
        RequestMetrics(1.0, 2.0, None),
    )
    assert unpack("r", pack(out, with_prompt=True)) == out
    bare = unpack("r", pack(out, with_prompt=False))
    assert bare.prompt is None and bare.prompt_token_ids is None
    assert bare.outputs == out.outputs and bare.metrics == out.metrics


class _BigOutputs:
    """An engine without a model whose every step gives each request 64 KiB of text: a reader
    that stops reading fills the pipe within a step or two."""

    def __init__(self, args):
        from types import SimpleNamespace

        self.tokenizer = None
        self.model_config = SimpleNamespace(served_model_name="big", max_model_len=1 << 20)
        self.vocab_size = 10
        self.live: dict[str, int] = {}
        self.steps = 0

    def apply_chat_template(self, messages):
        return [1]

    def add_request(self, request_id, prompt, params, priority=0):
        self.live[request_id] = params.max_tokens

    def abort_request(self, ids):
        return []

    def has_unfinished_requests(self):
        return bool(self.live)

    def get_stats(self):
        return self.steps

    def step(self):
        import time

        from asyncllm.outputs import CompletionOutput

        time.sleep(0.002)
        self.steps += 1
        outs = []
        for rid, left in list(self.live.items()):
            left -= 1
            done = left == 0
            c = CompletionOutput(0, "x" * 65536, [1], None, None, "length" if done else None)
            outs.append(RequestOutput(rid, None, [1], [c], finished=done))
            self.live[rid] = left
            if done:
                del self.live[rid]
        return outs


def _big_engine(args):
    return _BigOutputs(args)


def test_the_engine_process_never_waits_for_a_slow_reader():
    """Outputs that wait for the pipe merge in the child; its engine keeps stepping."""
    import time

    from asyncllm.engine.engine_loop import Add, Shutdown
    from asyncllm.engine.engine_process import EngineProcess

    proc = EngineProcess(EngineArgs(model="unused"), _big_engine)
    proc.start()
    steps = 200
    proc.send(Add("r", {"prompt_token_ids": [1]}, greedy(steps), 0))
    time.sleep(2.0)  # read nothing: 200 steps x 64 KiB is far more than a pipe holds
    text, last_stats, messages = "", None, 0
    while True:
        kind, payload = proc.recv()
        assert kind == "out", (kind, payload)
        items, last_stats = payload
        messages += 1
        out = items["r"]
        text += out.outputs[0].text
        if out.finished:
            break
    proc.send(Shutdown())
    while (kind := proc.recv()[0]) == "out":  # the loop's last rounds (stats only)
        pass
    assert kind == "bye"
    proc.join()
    assert text == "x" * 65536 * steps  # nothing lost, nothing repeated
    assert messages < steps / 4  # merged while nobody read, not one message per step
    assert last_stats == steps


def test_commands_queued_together_cross_in_one_message():
    """A wave of new requests queued while the sender thread waits for the GIL goes down the
    pipe as one message, so the engine admits it in one step (one message per command let 64
    of them arrive over several steps: ops/bench/NOTES.md, "Serving, third round")."""
    from asyncllm.engine.engine_loop import Abort, Shutdown
    from asyncllm.engine.transports import ProcessTransport

    class Recorder:
        def __init__(self):
            self.messages = []

        def send(self, msg):
            self.messages.append(msg)

    t = ProcessTransport(EngineArgs(engine_process=True))
    t.proc = Recorder()
    cmds = [Abort(f"r{i}") for i in range(3)]
    for c in cmds:
        t.send(c)
    t.send(Shutdown())
    t._run_sender()  # returns after the Shutdown
    assert len(t.proc.messages) == 1
    assert t.proc.messages[0][:3] == cmds and isinstance(t.proc.messages[0][3], Shutdown)
