"""Quantized checkpoints (GPTQ, AWQ, fp8 per-tensor / per-channel / block, fp8 at load) packed
by the test itself: greedy tokens equal transformers running the same weights dequantized to
float32; the bit layouts against hand-built words; bad configs get clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from asyncllm import LLM, SamplingParams
from asyncllm.engine.quantization import get_quant_config, int4_pack
from tests.quant_checkpoints import build_base, quantize_checkpoint
from tests.tiny_models import hf_greedy

PROMPTS = ["Hello world", "The capital of France is", "def f(x):\n    return"]
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("quant_base"))


# ---- bit layouts -------------------------------------------------------------------------------
def test_gptq_layout_words():
    q = torch.zeros(8, 8, dtype=torch.int32)
    q[3, 5] = 9  # input 3 of the first word row, output 5
    w = int4_pack.Int4Weights(
        q,
        torch.ones(1, 8, dtype=torch.float16),
        torch.full((1, 8), 8, dtype=torch.int32),
        torch.zeros(8, dtype=torch.int32),
    )
    stored = int4_pack.to_gptq(w)
    assert stored["qweight"].shape == (1, 8)
    assert stored["qweight"][0, 5].item() == 9 << 12  # input 8r+j in bits 4j..
    # v1 zeros: stored minus one, along the output dim: symmetric 8 -> 0x77777777
    assert stored["qzeros"].shape == (1, 1) and stored["qzeros"].item() == 0x77777777
    back = int4_pack.from_gptq(**stored)
    assert torch.equal(back.q, q) and torch.equal(back.zeros, w.zeros)


def test_awq_layout_interleaved():
    q = torch.zeros(1, 8, dtype=torch.int32)
    q[0, 2] = 5  # output 2 sits in nibble 1 of AWQ's order [0, 2, 4, 6, 1, 3, 5, 7]
    q[0, 1] = 3  # output 1 in nibble 4
    assert int4_pack.pack_cols(q, int4_pack.AWQ_ORDER).item() == (5 << 4) | (3 << 16)
    assert torch.equal(int4_pack.unpack_cols(int4_pack.pack_cols(q, int4_pack.AWQ_ORDER),
                                             int4_pack.AWQ_ORDER), q)  # fmt: skip


def test_negative_words_unpack():
    q = torch.full((8, 4), 15, dtype=torch.int32)  # every bit set: int32 -1
    packed = int4_pack.pack_rows(q)
    assert (packed == -1).all() and torch.equal(int4_pack.unpack_rows(packed), q)


@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, True)])
def test_quantizer_round_trip(sym, desc_act):
    w = torch.randn(24, 64)
    qw = int4_pack.quantize_int4(w, 16, sym=sym, desc_act=desc_act)
    deq = qw.dequantize()
    step = qw.scales.float().amax()
    assert (deq - w).abs().max() <= step  # round to nearest: within one step
    assert torch.equal(int4_pack.from_gptq(**int4_pack.to_gptq(qw)).dequantize(), deq)
    if not desc_act:
        assert torch.equal(int4_pack.from_awq(**int4_pack.to_awq(qw)).dequantize(), deq)


# ---- whole models on the CPU against transformers -----------------------------------------------
FORMATS = {
    "gptq-g32-sym": ("gptq", {"group_size": 32}),
    "gptq-g64-desc_act-asym": ("gptq", {"group_size": 64, "desc_act": True, "sym": False}),
    "gptq-g128": ("gptq", {"group_size": 128, "sym": False}),
    "gptq-per-column": ("gptq", {"group_size": -1}),
    "awq-g32": ("awq", {"group_size": 32}),
    "awq-g128": ("awq", {"group_size": 128}),
    "fp8-per-tensor": ("fp8-tensor", {}),
    "fp8-per-channel-static-input": ("fp8-channel", {"static_input": True}),
    "fp8-block": ("fp8-block", {"block": (32, 32)}),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_quantized_greedy_matches_dequantized_transformers(base, tmp_path, case):
    fmt, opts = FORMATS[case]
    qdir, pdir = quantize_checkpoint(base, fmt, tmp_path, **opts)
    tok = AutoTokenizer.from_pretrained(pdir)
    refs = [hf_greedy(pdir, tok.encode(p), MAX_NEW) for p in PROMPTS]
    llm = LLM(str(qdir))
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    layer = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.linear_method.name.startswith(fmt.split("-")[0])


def test_online_fp8_matches_fp8_rounded_weights(base, tmp_path):
    """quantization="fp8" on a float checkpoint: per-channel e4m3 at load. On the CPU that is the
    float32 model with every linear weight rounded through fp8, which transformers runs here."""
    qdir, pdir = quantize_checkpoint(base, "fp8-channel", tmp_path)
    tok = AutoTokenizer.from_pretrained(pdir)
    refs = [hf_greedy(pdir, tok.encode(p), MAX_NEW) for p in PROMPTS]
    llm = LLM(str(base), quantization="fp8")
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_runner_names_the_method(base, tmp_path, caplog):
    qdir, _ = quantize_checkpoint(base, "gptq", tmp_path)
    with caplog.at_level("INFO"):
        LLM(str(qdir))
    assert "linear=gptq-int4 (dequantized to float32 at load) + dense" in caplog.text


# ---- errors ------------------------------------------------------------------------------------
def _cfg(qc):
    from types import SimpleNamespace

    return SimpleNamespace(quantization_config=qc)


def test_config_errors():
    with pytest.raises(ValueError, match="8-bit weights are not supported"):
        get_quant_config(_cfg({"quant_method": "gptq", "bits": 8}))
    with pytest.raises(ValueError, match="'bitsandbytes' is not supported"):
        get_quant_config(_cfg({"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="checkpoint is 'awq'"):
        get_quant_config(_cfg({"quant_method": "awq", "bits": 4}), "gptq")
    with pytest.raises(ValueError, match="has no quantization_config"):
        get_quant_config(_cfg(None), "gptq")
    with pytest.raises(ValueError, match="quantization must be one of"):
        get_quant_config(_cfg(None), "int3")
    assert get_quant_config(_cfg(None)) is None
    assert get_quant_config(_cfg(None), "fp8").online


def test_engine_args_reject_unknown_quantization():
    from asyncllm import EngineArgs

    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineArgs(quantization="int2")


def test_group_size_that_does_not_divide(base, tmp_path):
    qdir, _ = quantize_checkpoint(base, "gptq", tmp_path)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 96  # 128 inputs are not a multiple of 96
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a multiple of the group size 96"):
        LLM(str(qdir))


def test_gptq_zero_biases_of_bias_free_layers_are_skipped(base, tmp_path):
    """GPTQ exporters write a zero `bias` for every linear layer; a nonzero one has no place."""
    from safetensors.torch import load_file, save_file

    qdir, pdir = quantize_checkpoint(base, "gptq", tmp_path)
    tensors = load_file(qdir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".qweight")]:
        tensors[name.replace(".qweight", ".bias")] = torch.zeros(tensors[name].shape[1])
    save_file(tensors, qdir / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(pdir)
    ref = hf_greedy(pdir, tok.encode(PROMPTS[0]), MAX_NEW)
    out = LLM(str(qdir)).generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref
    tensors["model.layers.0.mlp.down_proj.bias"] += 1.0
    save_file(tensors, qdir / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj.bias' has no place"):
        LLM(str(qdir))


# ---- the GPU: the kernels inside a whole model ---------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", ["gptq-g32-sym", "gptq-g64-desc_act-asym", "awq-g128", "fp8-per-channel-static-input",
             "fp8-block"],
)  # fmt: skip
def test_quantized_kernels_in_float32_match_transformers_on_gpu(base, tmp_path, case):
    """float32 on CUDA: the Triton W4A16 / W8A16 kernels (CUDA graphs on) compute the
    dequantized model exactly up to summation order: transformers' greedy tokens."""
    fmt, opts = FORMATS[case]
    qdir, pdir = quantize_checkpoint(base, fmt, tmp_path, **opts)
    tok = AutoTokenizer.from_pretrained(pdir)
    refs = [hf_greedy(pdir, tok.encode(p), MAX_NEW) for p in PROMPTS]
    llm = LLM(str(qdir), device="cuda", dtype="float32")
    layer = llm.llm_engine.runner.model.model.layers[0].mlp.down_proj
    assert not hasattr(layer, "_dense")  # the kernel path, not the dequantized fallback
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp8-per-tensor", "gptq-g128"])
def test_quantized_bf16_on_gpu_is_close_to_float32(base, tmp_path, case):
    """bfloat16 on CUDA (fp8: W8A8 _scaled_mm with per-token activation scales): the prompt's
    next-token distribution stays close to the float32 dequantized model's."""
    from transformers import AutoModelForCausalLM

    fmt, opts = FORMATS[case]
    qdir, pdir = quantize_checkpoint(base, fmt, tmp_path, **opts)
    ids = AutoTokenizer.from_pretrained(pdir).encode(PROMPTS[1])
    llm = LLM(str(qdir), device="cuda", dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(pdir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
    # bf16 noise on a tiny random model (tests/test_models.py allows as much for plain bf16)
    assert out.token_ids[0] in ref.topk(3).indices.tolist()
    for tok_id, lp in out.logprobs[0].items():
        assert abs(lp.logprob - ref[tok_id].item()) < 0.5


@pytest.mark.parametrize(
    "arch,fmt",
    [("qwen3_moe", "fp8-channel"), ("qwen2_moe", "fp8-tensor"), ("mixtral", "fp8-block")],
)
def test_fp8_moe_checkpoints_match_dequantized_transformers(tmp_path, arch, fmt):
    """fp8 experts (one tensor per expert projection, with its scales) and fp8 attention /
    shared-expert linears; the router stays float. Dequantized experts: transformers' tokens."""
    from tests.tiny_models import build_model

    src = build_model(arch, tmp_path / "src")
    qdir, pdir = quantize_checkpoint(src, fmt, tmp_path, block=(32, 32))
    tok = AutoTokenizer.from_pretrained(pdir)
    refs = [hf_greedy(pdir, tok.encode(p), MAX_NEW) for p in PROMPTS]
    llm = LLM(str(qdir))
    experts = next(m for m in llm.llm_engine.runner.model.modules() if hasattr(m, "quant_method"))
    assert experts.quant_method.name == "fp8"
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_int4_moe_checkpoints_are_refused_clearly(tmp_path):
    from tests.tiny_models import build_model

    src = build_model("qwen3_moe", tmp_path / "src")
    qdir, _ = quantize_checkpoint(src, "gptq", tmp_path, group_size=32)
    with pytest.raises(ValueError, match="no mixture-of-experts method"):
        LLM(str(qdir))
