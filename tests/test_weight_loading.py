"""The linear layers' weight_loaders: a checkpoint with q/k/v and gate/up stored separately (as
transformers saves them) and the same weights fused on disk (`qkv_proj`, `gate_up_proj`, as
Phi-3 stores them) load to the same model, whose greedy tokens equal transformers'; the shard
placement of the parallel layers; the start-up line naming the kernel paths."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tests.tiny_models import hf_greedy

PROMPTS = ["Hello world", "The capital of France is", "def f(x):\n    return"]
MAX_NEW = 10


def fuse_on_disk(src: str, dst: Path) -> Path:
    """A copy of the model directory whose safetensors hold q/k/v and gate/up fused, written
    from the transformers model's own state dict."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    fused: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            continue  # folded into the q_proj / gate_proj entry below
        if ".q_proj." in name:
            parts = [name.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat([state[p] for p in parts])
        elif ".gate_proj." in name:
            parts = [name, name.replace("gate_proj", "up_proj")]
            fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat([state[p] for p in parts])
        elif (
            name == "lm_head.weight"
            and t.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        ):
            continue  # tied: transformers saves no separate head
        else:
            fused[name] = t.contiguous()
    save_file(fused, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert any("qkv_proj" in k for k in fused) and not any(".q_proj." in k for k in fused)
    return dst


def greedy(path: str) -> list[list[int]]:
    llm = LLM(path, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3_scaled_untied"])
def test_separate_and_fused_checkpoints_match_transformers(tiny_model_dirs, tmp_path, arch):
    from transformers import AutoTokenizer

    path = tiny_model_dirs[arch]
    tok = AutoTokenizer.from_pretrained(path)
    want = [hf_greedy(path, tok.encode(p), MAX_NEW) for p in PROMPTS]
    assert greedy(path) == want  # q/k/v, gate/up separate: loaded by shard id
    fused_dir = fuse_on_disk(path, tmp_path / "fused")
    assert greedy(str(fused_dir)) == want  # fused on disk: loaded whole (shard id None)


def test_fused_and_sharded_loads_place_the_same_bytes():
    g = torch.Generator().manual_seed(0)
    qkv = QKVParallelLinear(16, 4, 4, 2, bias=True, tp_rank=0, tp_size=1)
    q, k, v = (torch.randn(n, 16, generator=g) for n in (16, 8, 8))
    bq, bk, bv = (torch.randn(n, generator=g) for n in (16, 8, 8))
    for sid, w, b in (("q", q, bq), ("k", k, bk), ("v", v, bv)):
        qkv.weight_loader(qkv.weight, w, sid)
        qkv.weight_loader(qkv.bias, b, sid)
    whole = QKVParallelLinear(16, 4, 4, 2, bias=True, tp_rank=0, tp_size=1)
    whole.weight_loader(whole.weight, torch.cat([q, k, v]))
    whole.weight_loader(whole.bias, torch.cat([bq, bk, bv]))
    assert torch.equal(qkv.weight, torch.cat([q, k, v])) and torch.equal(qkv.weight, whole.weight)
    assert torch.equal(whole.bias, torch.cat([bq, bk, bv]))
    x = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(qkv(x), x @ torch.cat([q, k, v]).T + torch.cat([bq, bk, bv]))
    with pytest.raises(ValueError, match="shape|rows"):
        qkv.weight_loader(qkv.weight, torch.randn(9, 16), "k")
    with pytest.raises(ValueError, match="unknown shard"):
        qkv.weight_loader(qkv.weight, k, "x")


def test_rank_shards_of_the_parallel_layers():
    """What rank r of 2 takes from a checkpoint tensor (the math the TP engine will rely on;
    the collectives themselves are the identity today)."""
    w = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    for r in (0, 1):
        col = ColumnParallelLinear(6, 8, tp_rank=r, tp_size=2)
        col.weight_loader(col.weight, w)
        assert torch.equal(col.weight, w[4 * r : 4 * r + 4])
        row = RowParallelLinear(6, 8, tp_rank=r, tp_size=2)
        row.weight_loader(row.weight, w)
        assert torch.equal(row.weight, w[:, 3 * r : 3 * r + 3])
        gu = MergedColumnParallelLinear(6, [4, 4], tp_rank=r, tp_size=2)
        gu.weight_loader(gu.weight, w[:4], 0)
        gu.weight_loader(gu.weight, w[4:], 1)
        assert torch.equal(gu.weight, torch.cat([w[2 * r : 2 * r + 2], w[4 + 2 * r : 6 + 2 * r]]))
        # 2 heads of 2, 1 KV head: the KV head is replicated on both ranks
        qkv = QKVParallelLinear(6, 2, 2, 1, tp_rank=r, tp_size=2)
        assert (qkv.num_heads, qkv.num_kv_heads) == (1, 1)
        qkv.weight_loader(qkv.weight, w)
        assert torch.equal(qkv.weight, torch.cat([w[2 * r : 2 * r + 2], w[4:6], w[6:8]]))


def test_startup_line_names_the_kernel_paths(tiny_model_dir, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="asyncllm.engine.kernel_paths"):
        LLM(tiny_model_dir, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncllm.engine.kernel_paths"]
    assert len(lines) == 1
    line = lines[0]
    for part in ("attention=torch", "fused ops=", "CPU decode attention=", "linear=dense",
                 "CUDA graphs=off"):  # fmt: skip
        assert part in line, line
    monkeypatch.setenv("ASYNCLLM_CPU_FUSED", "0")
    monkeypatch.setenv("ASYNCLLM_CPU_ATTENTION", "torch")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asyncllm.engine.kernel_paths"):
        llm = LLM(tiny_model_dir, device="cpu")
    line = caplog.records[-1].getMessage()
    assert "fused ops=torch" in line and "CPU decode attention=torch" in line, line
    model = llm.llm_engine.runner.model
    assert model.kernels.fused is None and not model.kernels.attention.decode_kernel
    assert all(getattr(m, "ops", None) is None for m in model.modules())


@pytest.mark.gpu
def test_startup_line_on_cuda(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="asyncllm.engine.kernel_paths"):
        LLM(tiny_model_dir, device="cuda")
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncllm.engine.kernel_paths"]
    assert len(lines) == 1
    for part in ("attention=triton", "fused ops=triton", "CPU decode attention=torch",
                 "linear=dense", "CUDA graphs=on"):  # fmt: skip
        assert part in lines[0], lines[0]
