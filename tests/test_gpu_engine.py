"""The engine on CUDA with the Triton backend and decode CUDA graphs, against transformers.

All marked gpu: they skip without CUDA (CI), and run on the lent H100 (ops/bench/NOTES.md)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, hf_greedy

pytestmark = pytest.mark.gpu

PROMPTS = [
    [5, 17, 42, 99],
    [7] * 3 + list(range(30, 90)),  # longer than a block, several decode tiles
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [200, 3, 150, 8, 64],
    list(range(100, 300, 3)),
]
MAX_NEW = 16
# A tiny model's blocks are a few KB: sizing the cache from 90% of an H100 would make millions of
# them (slow to set up); the memory-profiled sizing is exercised by the Qwen3-shape test below.
TINY_KV = {"num_kv_blocks": 4096}


@pytest.fixture(scope="module")
def hf_refs(tiny_model_dirs) -> dict[str, list[list[int]]]:
    return {a: [hf_greedy(p, ids, MAX_NEW) for ids in PROMPTS] for a, p in tiny_model_dirs.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "config",
    [{}, {"enforce_eager": True}, {"max_num_batched_tokens": 7, "block_size": 4}],
    ids=["graphs", "eager", "chunked"],
)
def test_gpu_float32_greedy_equals_transformers(tiny_model_dirs, hf_refs, arch, config):
    from asyncllm import LLM, SamplingParams

    llm = LLM(tiny_model_dirs[arch], device="cuda", dtype="float32", **TINY_KV, **config)
    # "triton(decode=..., prefill=...)": the kernel selection names each part
    assert llm.llm_engine.runner.attn_backend.name.startswith("triton")
    if not config:
        assert llm.llm_engine.runner.graph_runner is not None
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_refs[arch]
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_gpu_graphs_equal_eager_across_batch_buckets(tiny_model_dirs):
    """Batch sizes that pad into buckets (rows of slot -1 / length 0) change nothing."""
    from asyncllm import LLM, SamplingParams

    path = tiny_model_dirs["qwen3"]
    g = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 300, (int(n),), generator=g).tolist()}
        for n in torch.randint(2, 90, (37,), generator=g)
    ]
    # different lengths: the batch shrinks through many bucket sizes as requests finish
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True) for i in range(37)]
    graphs = LLM(path, device="cuda", dtype="float32", **TINY_KV).generate(
        prompts, params, use_tqdm=False
    )
    eager = LLM(path, device="cuda", dtype="float32", enforce_eager=True, **TINY_KV).generate(
        prompts, params, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]


def test_gpu_engine_smoke_bf16_sampling(tiny_model_dirs):
    from asyncllm import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["llama"], device="cuda", max_num_seqs=16, **TINY_KV)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    outs = llm.generate(
        ["Hello world", "The capital of France is"] * 10,
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, n=2, seed=1),
        use_tqdm=False,
    )
    assert len(outs) == 20
    for o in outs:
        assert len(o.outputs) == 2 and all(c.finish_reason in ("stop", "length") for c in o.outputs)
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


def test_gpu_bf16_teacher_forced_logprobs_match_transformers():
    """Qwen3-0.6B shape, random bf16 weights: the engine's greedy path scored again by
    transformers in one forward (teacher forcing), in bf16 and in float32 (the same weights
    upcast: the truth both bf16 runs approximate)."""
    from transformers import AutoModelForCausalLM

    from asyncllm import LLM, SamplingParams
    from asyncllm.bench.model import build_model_dir

    path = build_model_dir()  # written once per machine, shared with the benchmarks
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (40, 300, 700)]
    llm = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    ours: list[float] = []
    refs: dict[torch.dtype, list[float]] = {torch.bfloat16: [], torch.float32: []}
    for dtype, vals in refs.items():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        hf = hf.to("cuda", dtype).eval()
        for p, o in zip(prompts, outs, strict=True):
            comp = o.outputs[0]
            with torch.no_grad():
                logits = hf(torch.tensor([p + comp.token_ids], device="cuda")).logits[0]
            ref = torch.log_softmax(logits.float(), -1)
            for k, tok in enumerate(comp.token_ids):
                vals.append(ref[len(p) - 1 + k, tok].item())
                if dtype == torch.bfloat16:
                    ours.append(comp.logprobs[k][tok].logprob)
        del hf
        torch.cuda.empty_cache()
    o = torch.tensor(ours)
    hf16, hf32 = torch.tensor(refs[torch.bfloat16]), torch.tensor(refs[torch.float32])
    vs_hf16 = (o - hf16).abs()
    ours_err, hf_err = (o - hf32).abs().mean().item(), (hf16 - hf32).abs().mean().item()
    print(
        f"logprob |ours - hf bf16|: mean {vs_hf16.mean():.4f} max {vs_hf16.max():.4f}; "
        f"mean error vs float32: ours {ours_err:.4f}, transformers bf16 {hf_err:.4f} "
        f"({len(o)} tokens)"
    )
    # the comparison means something only if the distributions are far from uniform
    # (uniform over Qwen's vocabulary is -ln(151936) = -11.93)
    assert o.max() > -9.9, "logits too flat for a meaningful comparison"
    # Both sides round their logits to bf16 (one ulp is 0.0625 for logits in [8, 16)), so single
    # tokens differ by a few ulps; on average they agree within the 0.05.
    assert vs_hf16.mean() < 0.05
    assert vs_hf16.max() < 0.25
    # and the engine is as close to the float32 truth as transformers' own bf16 run is
    assert ours_err <= 1.5 * hf_err + 0.01


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_async_scheduling_gives_the_synchronous_outputs(tiny_model_dirs, eager):
    """On CUDA the steps really overlap: step N+1's decodes read step N's tokens on the device
    while the host resolves N. Every sampling feature, n > 1, stop tokens: same outputs."""
    from asyncllm import LLM
    from tests.test_async_scheduling import PROMPTS as TEXTS
    from tests.test_async_scheduling import _assert_same, _params, _summary

    outs = {}
    for mode in (False, True):
        llm = LLM(
            tiny_model_dirs["qwen3"],
            device="cuda",
            dtype="float32",
            async_scheduling=mode,
            enforce_eager=eager,
            **TINY_KV,
        )
        assert llm.llm_engine.async_scheduling is mode
        outs[mode] = _summary(llm.generate(TEXTS, _params(), use_tqdm=False))
        stats = llm.llm_engine.get_stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
    _assert_same(outs[True], outs[False])


def test_gpu_async_scheduling_is_the_cuda_default(tiny_model_dirs):
    from asyncllm import LLM

    llm = LLM(tiny_model_dirs["llama"], device="cuda", dtype="float32", **TINY_KV)
    assert llm.llm_engine.async_scheduling is True
