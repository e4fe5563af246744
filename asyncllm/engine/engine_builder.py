"""EngineArgs -> the engine's parts: resolve and load the model, pick device, dtype and attention
backend, size the KV cache from the memory budget."""

from __future__ import annotations

import logging
from typing import Any

import torch

from asyncllm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 512 * 1024**2
_DEFAULT_MAX_MODEL_LEN_CAP = 8192
# Prompt tokens per step on the CPU, where a step costs about its token count: decodes beside a
# long prompt then wait one chunk, not the whole prompt (ops/bench/canary_gap.py measures it).
CPU_MAX_PREFILL_TOKENS = 64


def cpu_prefill_context_scale(hf_config: Any) -> int:
    """SchedulerConfig.prefill_context_scale on the CPU: the context at which a prompt token
    costs twice one at the start, from the model's shape. A token's linears take L multiply-adds
    per layer, its attention 2 * heads * head_dim per context token; the CPU's attention path
    runs at half the linears' rate (measured on SmolLM2-135M: 64 tokens at 4096 of context cost
    3.1x 64 at 0, one thread, CPU time; ops/bench/NOTES.md), hence the / 2. SmolLM2-135M: 1536."""
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    inter = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    linear = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    return max(1, round(linear / (2 * heads * head_dim) / 2))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but CUDA is not available here "
            f"(torch {torch.__version__}); use --device cpu (or auto)"
        )
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _max_model_len(args: EngineArgs, hf_config: Any) -> int:
    model_max = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    if args.max_model_len is None:
        return min(model_max, _DEFAULT_MAX_MODEL_LEN_CAP)
    if args.max_model_len > model_max:
        raise ValueError(
            f"max_model_len {args.max_model_len} is longer than the model's "
            f"max_position_embeddings ({model_max})"
        )
    return args.max_model_len


def check_engine_args(args: EngineArgs) -> None:
    """What build_model_config would refuse (no model there, no CUDA, a max_model_len over the
    model's), found from the model's config alone: `asyncllm serve` asks before it loads
    anything, so a mistake is one line at once instead of a failed start-up later."""
    from asyncllm.engine.loader import load_hf_config, resolve_model

    resolved = resolve_model(args.model, args.revision)
    pick_device(args.device)
    _max_model_len(args, load_hf_config(resolved))


def build_model_config(args: EngineArgs) -> tuple[ModelConfig, Any]:
    from asyncllm.engine.loader import (
        load_generation_config,
        load_hf_config,
        load_tokenizer,
        resolve_model,
        resolve_tokenizer,
    )

    resolved = resolve_model(args.model, args.revision)
    hf_config = load_hf_config(resolved, args.trust_remote_code)
    tok_src = resolved if args.tokenizer is None else resolve_tokenizer(args.tokenizer)
    tokenizer = load_tokenizer(tok_src, args.trust_remote_code)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    max_len = _max_model_len(args, hf_config)
    name = args.served_model_name or (args.model if args.model else "SmolLM2-135M-Instruct")
    gen = load_generation_config(resolved.path, args.generation_config)
    mc = ModelConfig(
        path=resolved.path,
        hf_config=hf_config,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        served_model_name=name,
        gguf_file=resolved.gguf_file,
        load_format=args.load_format,
        quantization=args.quantization,
        cpu_weights=args.cpu_weights,
        generation_defaults=gen.defaults,
        generation_eos_token_ids=gen.eos_token_ids,
    )
    return mc, tokenizer


def _num_blocks(args: EngineArgs, mc: ModelConfig, runner: Any, max_batched: int) -> int:
    from asyncllm.engine.model_runner import kv_bytes_per_block

    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    per_block = kv_bytes_per_block(mc.hf_config, args.block_size, mc.dtype, runner.tp_size)
    if mc.device.type != "cuda":
        return max(1, (args.kv_cache_memory or _CPU_DEFAULT_KV_BYTES) // per_block)
    if args.kv_cache_memory is not None:
        return max(1, args.kv_cache_memory // per_block)
    budget = profile_free_gpu_memory(runner, mc, max_batched, args.gpu_memory_utilization)
    return max(1, budget // per_block)


def profile_free_gpu_memory(runner: Any, mc: ModelConfig, num_tokens: int, util: float) -> int:
    """Bytes left for the KV cache after a forward pass at the largest batch: the activations'
    peak is measured, not guessed."""
    from asyncllm.engine.layers.attention import AttentionMetadata

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dev = mc.device
    ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    pos = torch.arange(num_tokens, device=dev) % mc.max_model_len
    chunk = min(num_tokens, mc.max_model_len)
    # A paged backend reads every position of seq_lens through the block table, so the table
    # must cover the chunk: all profiling sequences share the same few blocks (nothing is
    # written: slots are -1), and their bytes are taken off the measured peak below.
    table_blocks = -(-chunk // runner.block_size)
    runner.allocate_kv_cache(table_blocks)
    temp_kv_bytes = sum(c.numel() * c.element_size() for c in runner.kv_caches)
    n_seqs = -(-num_tokens // chunk)
    qsl = [min(i * chunk, num_tokens) for i in range(n_seqs + 1)]
    lens = [qsl[i + 1] - qsl[i] for i in range(n_seqs)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
        block_tables=torch.arange(table_blocks, dtype=torch.int32, device=dev).repeat(n_seqs, 1),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
        decode_only=False,
    )
    with torch.inference_mode():
        hidden = runner.model(ids, pos, runner.kv_caches, meta)
        runner.model.compute_logits(hidden[-min(num_tokens, 256) :])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - temp_kv_bytes
    runner.kv_caches = []
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    used_by_others = total - free - torch.cuda.memory_allocated()
    budget = int(total * util) - peak - max(used_by_others, 0)
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={util}: raise it"
        )
    return budget


def build_engine_parts(args: EngineArgs):
    """(model config, cache config, scheduler config, tokenizer, runner, executor). With
    tensor_parallel_size > 1 the other ranks start here (tp_executor) and the executor
    broadcasts every step to them; this process is rank 0."""
    from asyncllm.engine.executor import UniProcExecutor

    torch.manual_seed(args.seed)
    mc, tokenizer = build_model_config(args)
    if args.tensor_parallel_size > 1:
        from asyncllm.engine.tp_executor import build_tensor_parallel

        mc, cc, sc, runner, executor = build_tensor_parallel(args, mc)
        return mc, cc, sc, tokenizer, runner, executor
    cc, sc, runner = build_runner(args, mc)
    if mc.device.type == "cuda":
        freeze_gc_heap()
    return mc, cc, sc, tokenizer, runner, UniProcExecutor(runner)


def freeze_gc_heap() -> bool:
    """Move every object alive now (the imported libraries, the model, the tokenizer) out of the
    cyclic collector's reach (ASYNCLLM_GC_FREEZE=0: no). Each full collection otherwise walks
    them all while the engine's steps allocate: on the CPU host-step benchmark that is ~30% of
    the host's time per step. Done once the engine is built, on CUDA (where the host is the
    step's critical path); not on the CPU, where tests build many engines in one process and
    frozen objects are never collected."""
    import gc

    from asyncllm import envs

    if not envs.gc_freeze():
        return False
    gc.collect()
    gc.freeze()
    return True


def build_runner(args: EngineArgs, mc: ModelConfig):
    """One rank's model runner: kernel paths, its shard of the model, its KV cache (as many
    blocks as every rank can hold, so that block tables mean the same on each), CUDA graphs.
    Every rank runs this, in the same order: its collectives must meet the others'."""
    from asyncllm.engine import distributed
    from asyncllm.engine.kernel_paths import log_kernel_paths, select_kernel_paths
    from asyncllm.engine.loader import load_model
    from asyncllm.engine.model_runner import ModelRunner

    # Every kernel path is chosen here, once, for this device and dtype.
    kernels = select_kernel_paths(
        mc.device,
        mc.dtype,
        args.attention_backend,
        cuda_graphs=mc.device.type == "cuda" and not args.enforce_eager,
    )
    attn = kernels.attention
    model = load_model(mc, kernels=kernels)
    max_batched = args.max_num_batched_tokens or (8192 if mc.device.type == "cuda" else 2048)
    sc = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_batched,
        max_model_len=mc.max_model_len,
        max_prefill_tokens=args.max_prefill_tokens
        or (None if mc.device.type == "cuda" else CPU_MAX_PREFILL_TOKENS),
        # On the CPU a chunk's cost grows with its context, so the budget prices it (the GPU's
        # budget is the whole step's, uncapped: nothing to price).
        prefill_context_scale=(
            None if mc.device.type == "cuda" else cpu_prefill_context_scale(mc.hf_config)
        ),
        async_scheduling=(
            mc.device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        ),
    )
    cc = CacheConfig(args.block_size, 0, args.enable_prefix_caching)
    runner = ModelRunner(mc, cc, sc, model, attn)
    cc.num_blocks = distributed.all_reduce_min(_num_blocks(args, mc, runner, max_batched))
    runner.allocate_kv_cache(cc.num_blocks)
    if distributed.get_tp_rank() == 0:
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens) on %s%s",
            cc.num_blocks,
            cc.block_size,
            cc.num_blocks * cc.block_size,
            mc.device,
            f", on each of {runner.tp_size} ranks" if runner.tp_size > 1 else "",
        )
    if kernels.cuda_graphs:
        try:
            from asyncllm.engine.cuda_graphs import enable_cuda_graphs
        except ImportError:
            logger.warning("CUDA graphs unavailable; decoding eagerly")
            kernels.cuda_graphs = False
        else:
            enable_cuda_graphs(runner)
    if distributed.get_tp_rank() == 0:
        log_kernel_paths(kernels, model)
    return cc, sc, runner
