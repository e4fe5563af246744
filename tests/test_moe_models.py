"""The MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) beyond the shared per-architecture tests
(test_models.py, test_llm.py, test_gpu_engine.py run them too): which layers are sparse, and
prefix-cache hits giving transformers' tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from asyncllm import LLM, SamplingParams
from asyncllm.engine.layers.moe import SparseMoeBlock
from asyncllm.engine.models.llama import MLP
from asyncllm.engine.models.moe_common import is_sparse_layer
from tests.tiny_models import hf_greedy

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def test_sparse_layer_rule():
    cfg = SimpleNamespace(num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [is_sparse_layer(cfg, i) for i in range(6)] == [False, True, False, False, False, True]
    assert not is_sparse_layer(SimpleNamespace(num_experts=0), 0)


def test_layers_are_built_as_the_config_says(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3_moe"])
    layers = llm.llm_engine.runner.model.model.layers
    kinds = [type(layer.mlp) for layer in layers]
    assert kinds == [SparseMoeBlock, MLP, SparseMoeBlock]  # mlp_only_layers=[1]
    assert layers[0].mlp.renormalize and layers[0].mlp.shared_expert is None
    qwen2 = LLM(tiny_model_dirs["qwen2_moe"]).llm_engine.runner.model.model.layers[0].mlp
    assert qwen2.shared_expert is not None and not qwen2.renormalize
    mixtral = LLM(tiny_model_dirs["mixtral"]).llm_engine.runner.model.model.layers[1].mlp
    assert mixtral.experts.num_experts == 3 and mixtral.renormalize


@pytest.mark.parametrize("arch", MOE)
def test_prefix_cache_hits_give_transformers_tokens(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    llm = LLM(path, block_size=4)
    prefix = [(7 * i + 3) % 300 for i in range(20)]  # 5 full blocks
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for n, tail in enumerate(([60, 61], [70, 71, 72])):
        out = llm.generate({"prompt_token_ids": prefix + tail}, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == (20 if n else 0)
        assert out.outputs[0].token_ids == hf_greedy(path, prefix + tail, 8)


def test_startup_line_names_the_moe_path(tiny_model_dirs, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="asyncllm.engine.kernel_paths"):
        llm = LLM(tiny_model_dirs["mixtral"], device="cpu")
    line = caplog.records[-1].getMessage()
    assert "moe=dense grouped-torch" in line, line
    assert not llm.llm_engine.runner.model.kernels.fused_moe


@pytest.mark.gpu
def test_startup_line_on_cuda_names_the_triton_moe(tiny_model_dirs, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="asyncllm.engine.kernel_paths"):
        llm = LLM(tiny_model_dirs["qwen2_moe"], device="cuda", num_kv_blocks=256)
    assert "moe=dense triton" in caplog.records[-1].getMessage()
    block = llm.llm_engine.runner.model.model.layers[0].mlp
    assert block.use_triton and block.experts.use_triton
