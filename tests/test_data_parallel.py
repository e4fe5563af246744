"""Data parallel on one host: where engines go (placement.py), which engine a request goes to
(dp_router.py), and DataParallelEngine with two real engine processes of the tiny model on the
CPU (one core each): outputs equal one engine's, the load is shared, a conversation's next turn
lands on the engine that caches its prefix, per-engine metrics, and one engine dying ends only its
own streams while the other serves on. Last, `asyncllm serve --data-parallel-size 2`."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import subprocess
import sys

import anyio
import httpx
import pytest

from asyncllm import LLM, EngineArgs, EngineDeadError, SamplingParams
from asyncllm.engine.dp_router import PrefixRouter, prefix_keys
from asyncllm.engine.placement import (
    PlacedFactory,
    Placement,
    cpu_groups,
    parse_cpulist,
    plan_placements,
)
from asyncllm.sampling_params import RequestOutputKind
from tests.gateway_helpers import WS, wait_healthy

# ---- placement ----------------------------------------------------------------------------------


def test_cpulist_and_groups():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cpu_groups(2, nodes) == [(0, 1, 2, 3), (4, 5, 6, 7)]  # a node each
    assert cpu_groups(1, nodes) == [(0, 1, 2, 3)]
    assert cpu_groups(3, nodes) == [(0, 1, 2), (3, 4, 5), (6, 7)]  # fewer nodes: split cores
    assert cpu_groups(2, [[0, 1]]) == [(0,), (1,)]
    with pytest.raises(ValueError, match="more than the 2 CPUs"):
        cpu_groups(3, [[0, 1]])


def test_plan_placements():
    gpus = plan_placements(2, "cuda", gpus=["3", "5"])
    assert [(p.index, p.cuda_device, p.cpus) for p in gpus] == [(0, "3", None), (1, "5", None)]
    with pytest.raises(ValueError, match="needs 3 GPUs; 2 visible"):
        plan_placements(3, "auto", gpus=["0", "1"])
    cpus = plan_placements(2, "cpu", nodes=[[0, 1], [2, 3]])
    assert [p.cpus for p in cpus] == [(0, 1), (2, 3)]
    assert "CPUs 2-3 (2 threads)" in cpus[1].describe()
    with pytest.raises(ValueError, match=">= 1"):
        plan_placements(0, "cpu", nodes=[[0]])
    # the factory crosses to a spawned child
    f = pickle.loads(pickle.dumps(PlacedFactory(cpus[1])))
    assert f.placement == cpus[1] and f.inner is None


# ---- routing ------------------------------------------------------------------------------------


def test_least_loaded_and_ties_in_turn():
    r = PrefixRouter(3)
    assert r.choose("short", [2, 0, 1], [True] * 3) == (1, 0)
    assert r.choose("short", [0, 0, 5], [True, False, True]) == (0, 0)  # dead: never
    picks = {r.choose([7], [0, 0, 0], [True] * 3)[0] for _ in range(3)}
    assert picks == {0, 1, 2}  # idle engines take turns
    with pytest.raises(LookupError):
        r.choose([1], [0, 0, 0], [False] * 3)


def test_same_conversation_same_engine_within_slack():
    r = PrefixRouter(2, block_size=4, slack=2)
    turn1 = list(range(100, 140))  # 10 blocks
    e, matched = r.choose({"prompt_token_ids": turn1}, [0, 0], [True, True])
    assert matched == 0
    other = 1 - e
    turn2 = turn1 + [9, 9, 9, 9, 8, 8, 8, 8]
    # its engine is busier, within the slack: the prefix wins
    loads = [0, 0]
    loads[e] = 2
    assert r.choose({"prompt_token_ids": turn2}, loads, [True, True]) == (e, 10)
    # too much busier: the load wins
    loads[e] = 3
    assert r.choose({"prompt_token_ids": turn2 + [1] * 4}, loads, [True, True])[0] == other
    # a shared first block alone (a system prompt) pulls too, within the slack
    assert r.choose(turn1[:4] + [5] * 36, [0, 0], [True, True]) == (other, 1)
    # text prompts chain by 64-character chunks; a dead engine's prefixes are forgotten
    text = "x" * 200
    e2, _ = r.choose(text, [0, 0], [True, True])
    assert r.choose(text + "more", [0, 0], [True, True]) == (e2, 3)
    r.forget_engine(e2)
    assert r.choose(text + "again", [1, 0] if e2 == 0 else [0, 1], [True, True])[1] == 0
    assert prefix_keys(list(range(10)), 4, 1) == prefix_keys(list(range(9)), 4, 1)
    assert len(prefix_keys(list(range(4000)), 16, 256)) == 250
    assert prefix_keys(None, 16, 8) == []


# ---- two real engine processes ------------------------------------------------------------------

PROMPTS = ["Hello world", "The capital of France is", "Once upon a time there was", "Café"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )


def _two_cores() -> list[Placement]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs (one engine per core)")
    return plan_placements(2, "cpu", nodes=[cpus])


def _args(path: str) -> EngineArgs:
    return EngineArgs(model=path, device="cpu", num_kv_blocks=128, block_size=4)


async def _run(engine, prompt, n: int, rid: str | None = None) -> tuple[list[int], str]:
    ids, text = [], ""
    async for out in engine.generate(prompt, greedy(n), request_id=rid):
        ids += out.outputs[0].token_ids
        text += out.outputs[0].text
    return ids, text


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_engines_share_route_by_prefix_report_and_survive_a_death(tiny_model_dir):
    from asyncllm.engine.data_parallel import DataParallelEngine
    from asyncllm.gateway.metrics import Metrics

    refs = LLM(tiny_model_dir, num_kv_blocks=128, block_size=4).generate(
        PROMPTS, greedy(16), use_tqdm=False
    )
    dp = DataParallelEngine.from_engine_args(_args(tiny_model_dir), 2, placements=_two_cores())
    async with dp:
        assert dp.size == 2 and dp.model_config.max_model_len == 512 and not dp.errored
        got: dict[str, tuple[list[int], str]] = {}

        async def one(p: str) -> None:
            got[p] = await _run(dp, p, 16)

        async with anyio.create_task_group() as tg:
            for p in PROMPTS:
                tg.start_soon(one, p)
        for p, ref in zip(PROMPTS, refs, strict=True):
            assert got[p] == (ref.outputs[0].token_ids, ref.outputs[0].text)
        states = dp.engine_states()
        assert [s.routed for s in states] == [2, 2]  # least loaded: two each
        assert all(s.alive and s.in_flight == 0 for s in states)

        # a conversation's next turn goes where its prefix is cached
        turn1 = dp.tokenizer.encode("The sky is blue and the grass is green. " * 3)
        await _run(dp, {"prompt_token_ids": turn1}, 4)
        holder = max(range(2), key=lambda i: dp.engine_states()[i].routed - 2)
        hits_before = dp.engines[holder].stats().prefix_cache_hit_tokens
        ids, _ = await _run(dp, {"prompt_token_ids": turn1 + [5, 6, 7]}, 4)
        after = dp.engine_states()
        assert after[holder].prefix_routed == 1 and after[holder].routed == 4
        assert dp.engines[holder].stats().prefix_cache_hit_tokens - hits_before >= 4 * (
            len(turn1) // 4 - 1
        )

        # per-engine metrics
        text = Metrics(dp.stats, dp.engine_states).render().decode()
        assert 'asyncllm_dp_engine_alive{engine="0"} 1.0' in text
        assert 'asyncllm_dp_requests_routed_total{engine="1"}' in text
        assert 'asyncllm_dp_kv_blocks_total{engine="1"} 128.0' in text

        # one engine dies under a stream of each: only its own stream ends, with its error
        results: dict[int, object] = {}

        async def long(i: int) -> None:
            try:
                results[i] = await _run(dp, f"long story {i}", 400, rid=f"long{i}")
            except EngineDeadError as e:
                results[i] = e

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(long, i)
            with anyio.fail_after(30):
                while len(dp._owner) < 2 or min(s.num_running for s in _live_stats(dp)) < 1:
                    await anyio.sleep(0.02)
            victim = dp._owner["long1"]
            os.kill(dp.engines[victim]._transport.proc.proc.pid, signal.SIGKILL)
        assert isinstance(results[1], EngineDeadError)
        assert "engine process" in str(results[1])
        assert len(results[0][0]) == 400  # the other engine finished its stream
        assert not dp.errored
        states = dp.engine_states()
        assert states[victim].alive is False and states[1 - victim].alive is True
        text = Metrics(dp.stats, dp.engine_states).render().decode()
        assert f'asyncllm_dp_engine_alive{{engine="{victim}"}} 0.0' in text
        # new requests go to the live engine, whatever their prefix
        assert (await _run(dp, PROMPTS[0], 16))[0] == refs[0].outputs[0].token_ids
        assert dp.engine_states()[1 - victim].in_flight == 0
        assert dp.stats().kv_blocks_total == 128  # the live engine's only


def _live_stats(dp):
    return [s.stats for s in dp.engine_states() if s.stats is not None]


# ---- the CLI ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_data_parallel_size_2(tiny_model_dir):
    _two_cores()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncllm.cli", "serve", tiny_model_dir, "--port", str(port)]
        + ["--device", "cpu", "--data-parallel-size", "2", "--num-kv-blocks", "64"]
        + ["--max-model-len", "128", "--no-ui", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, 120, poll=0.1)
        ws = WS(f"ws://127.0.0.1:{port}/v1/ws")
        for i in range(4):
            ws.send(
                {"type": "complete", "id": i, "prompt": f"Hello {i}", "params": {"max_tokens": 8}}
            )
        ws.until_done(range(4))
        assert all(ws.done(i)["usage"]["completion_tokens"] == 8 for i in range(4))
        ws.close()
        text = httpx.get(base + "/metrics", timeout=5).text
        for e in ("0", "1"):
            assert f'asyncllm_dp_engine_alive{{engine="{e}"}} 1.0' in text
        routed = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("asyncllm_dp_requests_routed_total{")
        ]
        assert len(routed) == 2 and sum(routed) == 4 and min(routed) >= 1
        assert "asyncllm_kv_blocks_total 128.0" in text  # the group's sum
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "data parallel: engine 1: CPUs" in err


def test_serve_data_parallel_refuses_the_engine_thread(tiny_model_dir):
    from asyncllm.cli import build_parser

    r = subprocess.run(
        [sys.executable, "-m", "asyncllm.cli", "serve", tiny_model_dir, "--data-parallel-size", "2"]
        + ["--no-engine-process", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "drop --no-engine-process" in r.stderr
    assert build_parser().parse_args(["serve"]).data_parallel_size == 1


@pytest.mark.gpu
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_gpus_one_engine_each(tiny_model_dir):
    """On a host with 2+ GPUs: engine i runs on GPU i (its KV cache fills that GPU's memory),
    and greedy outputs equal one engine's."""
    import torch

    from asyncllm.engine.data_parallel import DataParallelEngine

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    llm = LLM(tiny_model_dir, device="cuda", gpu_memory_utilization=0.3)
    refs = llm.generate(PROMPTS, greedy(16), use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    free_before = [torch.cuda.mem_get_info(i)[0] for i in range(2)]
    args = EngineArgs(model=tiny_model_dir, device="cuda", gpu_memory_utilization=0.3)
    async with DataParallelEngine.from_engine_args(args, 2) as dp:
        assert len({p.cuda_device for p in dp.placements}) == 2
        for i in range(2):  # each child took about 0.3 of its own GPU
            total = torch.cuda.mem_get_info(i)[1]
            assert free_before[i] - torch.cuda.mem_get_info(i)[0] > 0.2 * total, i
        got: dict[str, list[int]] = {}

        async def one(p: str) -> None:
            got[p] = (await _run(dp, p, 16))[0]

        async with anyio.create_task_group() as tg:
            for p in PROMPTS:
                tg.start_soon(one, p)
        assert [got[p] for p in PROMPTS] == [r.outputs[0].token_ids for r in refs]
        assert [s.routed for s in dp.engine_states()] == [2, 2]
