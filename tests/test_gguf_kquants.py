"""GGUF files with K-quant (and other non-legacy) tensors: a tiny Llama written here with
random quants and sane fp16 scales (gguf cannot quantize K types itself) loads, dequantizes to
what transformers dequantizes, gives its logits and greedy tokens, and says what it holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"
)

HIDDEN, INTER, VOCAB_MIN = 256, 512, 300  # K-quant rows are whole 256-weight super-blocks
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL")
# Byte offsets of each block's fp16 scales (the rest of a block is random quants).
F16_AT = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,),
          "IQ4_NL": (0,)}  # fmt: skip


def _blocks(shape: tuple[int, ...], qtype, rng) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) // block
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in F16_AT[qtype.name]:
        scale = rng.uniform(0.002, 0.03, n).astype(np.float16).view(np.uint8).reshape(n, 2)
        data[:, at : (at + 2) or None] = scale
    return data.reshape(*shape[:-1], -1)


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory) -> Path:
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from asyncllm.engine import loader
    from tests.tiny_models import build_tokenizer

    out = tmp_path_factory.mktemp("kquant")
    tok = build_tokenizer(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)  # names and norms only
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out / "tiny-kquant.gguf"), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(2)
    w.add_feed_forward_length(INTER)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // 4)
    w.add_vocab_size(len(tok))
    layer_names = {v: k for k, v in loader._GGUF_LAYER_NAMES.items()}
    top_names = {v: k for k, v in loader._GGUF_TOP_NAMES.items()}
    i = 0
    for name, t in load_file(out / "model.safetensors").items():
        stem, suffix = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            layer, part = stem[len("model.layers.") :].split(".", 1)
            gname = f"blk.{layer}.{layer_names[part]}.{suffix}"
        else:
            gname = f"{top_names[stem]}.{suffix}"
        if t.ndim == 2:
            qtype = gguf.GGMLQuantizationType[TYPES[i % len(TYPES)]]
            i += 1
            w.add_tensor(gname, _blocks(t.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(gname, (1.0 + 0.1 * rng.standard_normal(t.shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (out / "model.safetensors").unlink()  # only the GGUF holds weights
    (out / "config.json").unlink()
    return out / "tiny-kquant.gguf"


def _hf(f: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(f.parent), gguf_file=f.name, dtype=torch.float32
    ).eval()


def test_kquant_tensors_dequantize_as_transformers_does(kquant_gguf):
    from asyncllm.engine.loader import iter_gguf, load_hf_config, resolve_model

    cfg = load_hf_config(resolve_model(str(kquant_gguf)))
    theirs = _hf(kquant_gguf).state_dict()
    ours = dict(iter_gguf(str(kquant_gguf), cfg))
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], atol=0, rtol=0, msg=name)


def test_kquant_gguf_greedy_matches_transformers(kquant_gguf, caplog):
    from asyncllm import LLM, SamplingParams

    prompts = [[5, 17, 42, 99, 3], [1, 2, 3], [250, 7, 8, 61]]
    with caplog.at_level("INFO"):
        llm = LLM(str(kquant_gguf), tokenizer=str(kquant_gguf.parent))
    assert "Q4_K x" in caplog.text and "Q6_K x" in caplog.text and "IQ4_NL x" in caplog.text
    assert "dequantized to float32 at load" in caplog.text
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = _hf(kquant_gguf)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, len(p) :].tolist()
        # and the same distribution, not only the same argmax
        ids = p + out.outputs[0].token_ids
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
        for k, (tok, entry) in enumerate(
            zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
        ):
            assert abs(entry[tok].logprob - lp[len(p) - 1 + k, tok].item()) < 1e-3
