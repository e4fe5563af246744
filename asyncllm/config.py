"""EngineArgs (the user's knobs) and the configs the engine is built from.

Bad values raise ValueError naming the field, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("auto", "torch", "triton")
_LOAD_FORMATS = ("auto", "dummy")
_CPU_WEIGHTS = ("auto", "float32", "quantized")
_QUANTIZATIONS = ("fp8", "gptq", "awq", "compressed-tensors")  # = quantization.QUANTIZATIONS


@dataclass
class EngineArgs:
    model: str | None = None  # HF dir, hub cache repo id, .gguf file; None = the default model
    # A tokenizer other than the model's: a directory, a .gguf file or a cached hub repo id.
    tokenizer: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    seed: int = 0
    max_model_len: int | None = None  # None: the model's own limit, capped at 8192
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache (CPU default: 512 MiB)
    gpu_memory_utilization: float = 0.90
    num_kv_blocks: int | None = None  # overrides both memory knobs (tests use it)
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(2048, max_model_len) capped at 8192
    # Of each step's budget, at most this many prompt tokens (chunks of waiting or partly
    # prefilled prompts), so running decodes keep flowing beside a long prompt. None: 64 on
    # the CPU (a step there costs ~per token), the whole budget on CUDA. On the CPU each token
    # is charged for its context (SchedulerConfig.prefill_context_scale, from the model's shape).
    max_prefill_tokens: int | None = None
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    enforce_eager: bool = False  # no CUDA graphs
    # Schedule and launch step N+1 before step N's sampled tokens reach the host, so the host's
    # per-step work overlaps the GPU's. None: on for CUDA (on the CPU nothing runs asynchronously).
    async_scheduling: bool | None = None
    # AsyncLLMEngine: run the engine loop in a child process, so that it shares no GIL with the
    # event loop streaming its outputs (servers with many streams on a GPU).
    engine_process: bool = False
    # Let transformers run config/tokenizer code shipped with the model (AutoConfig,
    # AutoTokenizer); the network is still never reached, and the architecture must be ours.
    trust_remote_code: bool = False
    served_model_name: str | None = None
    # "dummy": random weights instead of the checkpoint's (benchmarks of a model's shape: only
    # config.json and the tokenizer need to exist)
    load_format: str = "auto"
    # The checkpoint's quantization ("fp8", "gptq", "awq", "compressed-tensors"); None: read
    # from config.json's quantization_config. "fp8" on a float checkpoint quantizes it at load.
    quantization: str | None = None
    # A GGUF file's quantized weights on the CPU: "float32" dequantizes every tensor at load
    # (oneDNN float32 products: the exact path tests compare with transformers), "quantized"
    # keeps Q4_0/Q4_1/Q8_0 tensors in their blocks and multiplies them with a C kernel of ours
    # (float32 activations, int8 per block at <= ASYNCLLM_CPU_INT8_ROWS rows on AVX512-VNNI;
    # 4-5x less weight memory; faster at one stream, slower batched on the 2-core VM:
    # ops/bench/NOTES.md "CPU"), "auto": float32 (see there why).
    cpu_weights: str = "auto"
    # vLLM's --generation-config: "auto" reads the model's generation_config.json for default
    # sampling values (a request's own values win), "vllm" ignores them, or a folder holding one.
    # Its EOS ids are used either way.
    generation_config: str = "auto"
    # Split the model across this many ranks (one process each, one device each: cuda:0..N-1, or
    # the CPU); the engine's own process is rank 0 (vLLM's name).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}"
            )
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two <= 128, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.quantization is not None and self.quantization not in _QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.cpu_weights not in _CPU_WEIGHTS:
            raise ValueError(f"cpu_weights must be one of {_CPU_WEIGHTS}, got {self.cpu_weights!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(
                "generation_config must be 'auto', 'vllm' or a folder holding "
                f"generation_config.json, got {self.generation_config!r}"
            )
        if (
            not isinstance(self.tensor_parallel_size, int)
            or isinstance(self.tensor_parallel_size, bool)
            or self.tensor_parallel_size < 1
        ):
            raise ValueError(
                f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise ValueError(f"unknown engine arguments: {sorted(unknown)}")
        return cls(**kwargs)


@dataclass
class CacheConfig:
    block_size: int
    num_blocks: int  # filled in once memory is measured
    enable_prefix_caching: bool


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    async_scheduling: bool = False
    max_prefill_tokens: int | None = None  # per step; None: max_num_batched_tokens
    # While the cap applies, a prompt token at context c costs 1 + c / prefill_context_scale
    # tokens of it (attention over the prefix grows with c), so chunks shrink as the prompt's
    # prefix grows and a step costs about the same at any depth. None: a token costs 1.
    prefill_context_scale: int | None = None


@dataclass
class ModelConfig:
    path: str  # local directory holding config.json (or the converted GGUF)
    hf_config: Any = field(repr=False)
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    max_model_len: int
    served_model_name: str
    gguf_file: str | None = None
    load_format: str = "auto"
    quantization: str | None = None  # EngineArgs.quantization
    cpu_weights: str = "auto"  # EngineArgs.cpu_weights
    # From generation_config.json: SamplingParams defaults, and EOS ids beyond the config's.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    generation_eos_token_ids: list[int] = field(default_factory=list)
