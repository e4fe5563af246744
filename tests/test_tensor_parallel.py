"""Issue 18's proofs on the CPU (gloo, float32): tensor_parallel_size 2 and 4 give transformers'
greedy tokens for Llama with GQA (KV heads split at 2 ranks, replicated at 4, tied and untied
heads), Qwen3 and MoE models (Qwen2-MoE, Qwen3-MoE: every expert split inside), through chunked
prefill, prefix caching and preemption, with both step orders; logprobs within tolerance; a dead
rank ends every stream with EngineDeadError and leaves no process behind; `asyncllm serve
--tensor-parallel-size 2` (the engine in its own process) streams over WebSocket and /health turns
503 when a rank is killed while idle. GPU-marked twins run NCCL inside CUDA graphs.

Each rank is a process: the machine has 2 cores, so every rank runs one torch thread
(ASYNCLLM_TP_CPU_THREADS=1) and each engine is started once per test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import anyio
import httpx
import pytest

from asyncllm import LLM, AsyncLLMEngine, EngineArgs, EngineDeadError, SamplingParams
from asyncllm.sampling_params import RequestOutputKind
from tests.tiny_models import hf_greedy

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time there was a little model that could",
    "Café, naïve, résumé",
    "def f(x):\n    return",
]
MAX_NEW = 12
# Every prompt split across steps (5 tokens a step), and 40 tokens of KV for 5 sequences of ~20:
# chunked prefill and preemption in every run; the second pass hits the prefix cache.
TIGHT = {"max_num_batched_tokens": 5, "num_kv_blocks": 10, "block_size": 4}
CPU = {"device": "cpu"}  # gloo, also on a machine with GPUs


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("ASYNCLLM_TP_CPU_THREADS", "1")


def _worker_pids(parent: int) -> list[int]:
    """The tensor-parallel workers whose parent is `parent`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"asyncllm.engine.tp_worker" in cmd:
            pids.append(int(d))
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too: it holds nothing but its exit status, waiting for its parent.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def _greedy(n: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def references(tiny_model_dirs) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    refs = {}
    for arch in ("llama", "llama3_scaled_untied", "qwen3", "qwen2_moe", "qwen3_moe"):
        path = tiny_model_dirs[arch]
        tok = AutoTokenizer.from_pretrained(path)
        refs[arch] = [hf_greedy(path, tok.encode(p), MAX_NEW) for p in PROMPTS]
    return refs


def _check_greedy(llm: LLM, expected: list[list[int]], tp: int) -> list[int]:
    """Both passes give transformers' tokens (the second from the prefix cache), through
    chunked prefill and preemption; the ranks hold their share of the heads. The worker pids."""
    pids = llm.llm_engine.executor.workers.pids
    assert len(pids) == tp - 1 and sorted(_worker_pids(os.getpid())) == sorted(pids)
    for pid in pids:  # NVLink multicast off in every rank's environment, on the CPU too
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env[b"NCCL_NVLS_ENABLE"] == b"0" and env[b"NVSHMEM_DISABLE_NVLS"] == b"1"
        assert env[b"TORCH_SYMM_MEM_DISABLE_MULTICAST"] == b"1"
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # and in rank 0's, this process
    runner = llm.llm_engine.runner
    assert runner.model.model.layers[0].self_attn.num_heads == 4 // tp
    assert runner.kv_caches[0].shape[3] == max(1, 2 // tp)  # this rank's KV heads
    for _ in range(2):
        outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    return pids


def _check_no_worker_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived its engine"
        time.sleep(0.05)
    assert _worker_pids(os.getpid()) == []


@pytest.mark.parametrize(
    "arch, tp, async_scheduling",
    [
        ("llama", 2, True),  # KV heads split; the in-flight step's ids broadcast to the ranks
        ("qwen3", 2, False),
        ("qwen3", 4, True),  # 2 KV heads on 4 ranks: each replicated on two
        # MoE, every expert split across the ranks (tensor parallel inside the experts): a
        # shared expert behind a gate, top-k not renormalised; dense and sparse layers mixed
        ("qwen2_moe", 2, False),
        ("qwen3_moe", 2, False),
    ],
)
def test_greedy_matches_transformers(tiny_model_dirs, references, arch, tp, async_scheduling):
    kw = {"tensor_parallel_size": tp, "async_scheduling": async_scheduling, **TIGHT, **CPU}
    with LLM(tiny_model_dirs[arch], **kw) as llm:
        pids = _check_greedy(llm, references[arch], tp)
    _check_no_worker_left(pids)


def test_untied_head_greedy_logprobs_and_prompt_logprobs(tiny_model_dirs, references):
    """A vocabulary-split head of its own (llama3 rope scaling too); logprobs of sampled and of
    prompt tokens (the prompt's logits gathered per chunk) within 1e-4 of transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["llama3_scaled_untied"]
    prompt = [5, 17, 42, 99, 7, 3, 11, 12]
    with LLM(path, tensor_parallel_size=2, **TIGHT, **CPU) as llm:
        pids = _check_greedy(llm, references["llama3_scaled_untied"], 2)
        params = _greedy(6, logprobs=3, prompt_logprobs=2)
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    _check_no_worker_left(pids)
    comp = out.outputs[0]
    ids = prompt + comp.token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for k, entry in enumerate(comp.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert comp.token_ids[k] == int(row.argmax()) and len(entry) >= 3
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert prompt[pos] in entry
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[pos - 1][tid].item()) < 1e-4


def test_bad_tensor_parallel_sizes_fail_before_any_process_starts(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineArgs(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineArgs(tensor_parallel_size="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 attention heads"):
        LLM(tiny_model_dir, tensor_parallel_size=3, **CPU)
    assert _worker_pids(os.getpid()) == []


def test_kv_cache_shape_per_rank(tiny_model_dirs):
    from asyncllm.engine.loader import load_hf_config, resolve_model
    from asyncllm.engine.models import kv_cache_shape

    cfg = load_hf_config(resolve_model(tiny_model_dirs["llama"]))  # 2 KV heads of 16
    assert [kv_cache_shape(cfg, tp) for tp in (1, 2, 4)] == [(2, 2, 16), (2, 1, 16), (2, 1, 16)]


# ---- a dead rank ------------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_dead_rank_ends_every_stream(tiny_model_dir):
    args = EngineArgs(model=tiny_model_dir, tensor_parallel_size=2, num_kv_blocks=64, **CPU)
    eng = AsyncLLMEngine.from_engine_args(args)
    async with eng:
        (pid,) = _worker_pids(os.getpid())
        errors: list[tuple[BaseException, float]] = []
        killed_at: list[float] = []

        async def one(i: int) -> None:
            try:
                async for out in eng.generate(PROMPTS[i], _greedy(100_000)):
                    if i == 0 and len(out.outputs[0].token_ids) >= 2 and not killed_at:
                        os.kill(pid, signal.SIGKILL)
                        killed_at.append(time.monotonic())
            except EngineDeadError as e:
                errors.append((e, time.monotonic()))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, i)
        assert len(errors) == 3 and eng.errored
        assert "tensor-parallel rank 1 died" in str(errors[0][0])
        assert max(t for _, t in errors) - killed_at[0] < 5.0
        with pytest.raises(EngineDeadError):
            eng.generate("Hello", _greedy(2))
    assert _gone(pid) and _worker_pids(os.getpid()) == []


# ---- asyncllm serve ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_streams_over_websocket_and_a_dead_rank_turns_health_503(tiny_model_dir):
    """The engine in its own process (serve's default on a GPU), which starts the ranks; the
    rank is killed while the engine is idle, so only the monitor can notice."""
    from transformers import AutoTokenizer

    from tests.gateway_helpers import WS, wait_healthy

    expected = hf_greedy(
        tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir).encode("Hello world"), 8
    )
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncllm.cli", "serve", tiny_model_dir, "--port", str(port)]
        + ["--tensor-parallel-size", "2", "--engine-process", "--device", "cpu"]
        + ["--num-kv-blocks", "32", "--max-model-len", "128", "--log-level", "warning"],
        env={**os.environ, "ASYNCLLM_API_KEYS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        wait_healthy(proc, base, 120, poll=0.2)
        (engine_pid,) = [p for p in _children(proc.pid) if _worker_pids(p)]
        pids = _worker_pids(engine_pid)
        assert len(pids) == 1
        ws = WS(f"ws://127.0.0.1:{port}/v1/ws")
        params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        ws.send({"type": "complete", "id": 1, "prompt": "Hello world", "params": params})
        ws.until_done([1])
        deltas = ws.of(1, "delta")
        assert len(deltas) > 1  # streamed, not one answer at the end
        assert [t for d in deltas for t in d["token_ids"]] == expected
        assert ws.done(1)["finish_reason"] == "length"
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while httpx.get(base + "/health", timeout=2).status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503"
            time.sleep(0.05)
        ws.send({"type": "complete", "id": 2, "prompt": "Hello", "params": params})
        err = ws.until(lambda f: f.get("id") == 2 and f["type"] in ("error", "done"))
        assert err["type"] == "error" or err["finish_reason"] == "error", err
        ws.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err_text = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert "tensor-parallel rank 1 died" in err_text
    assert pids and all(_gone(p) for p in pids) and _children(proc.pid) == []


def _children(parent: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


# ---- GPUs -------------------------------------------------------------------------------------
def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_gpu_greedy_with_cuda_graphs_matches_transformers(tiny_model_dirs, references, arch, tp):
    """NCCL all-reduces inside the decode graphs; float32 so tokens compare exactly; the same
    chunked prefill, preemption and prefix hits as on the CPU."""
    if _gpus() < tp:
        pytest.skip(f"needs {tp} GPUs")
    kw = {"tensor_parallel_size": tp, "device": "cuda", "dtype": "float32", **TIGHT}
    with LLM(tiny_model_dirs[arch], **kw) as llm:
        assert llm.llm_engine.runner.graph_runner is not None
        assert llm.llm_engine.async_scheduling  # CUDA's default: ids broadcast on the device
        pids = _check_greedy(llm, references[arch], tp)
    _check_no_worker_left(pids)


@pytest.mark.gpu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_gpu_a_dead_rank_ends_every_stream(tiny_model_dir):
    """NCCL: the monitor aborts the communicators, so rank 0 does not wait in a collective."""
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    args = EngineArgs(model=tiny_model_dir, tensor_parallel_size=2, device="cuda", num_kv_blocks=64)
    async with AsyncLLMEngine.from_engine_args(args) as eng:
        (pid,) = _worker_pids(os.getpid())
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                params = _greedy(100_000, output_kind=RequestOutputKind.DELTA)
                async for out in eng.generate(PROMPTS[i], params):
                    if i == 0 and out.outputs[0].token_ids and not _gone(pid):
                        os.kill(pid, signal.SIGKILL)
            except EngineDeadError as e:
                errors.append(e)

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, i)
        assert len(errors) == 3
    assert _worker_pids(os.getpid()) == []
