"""Every `ASYNCLLM_*` environment variable, in one place, typed and documented.

Each is read through a function, at the moment it is needed (tests monkeypatch the environment),
never cached at import. Importing this module imports no torch (the client and gateway use it).
The engine reads its kernel switches once, at start-up (asyncllm.engine.kernel_paths).
"""

from __future__ import annotations

import os
from pathlib import Path


def _str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _flag(name: str, default: bool) -> bool:
    """`0` turns a switch off, anything else (set and non-empty) on."""
    value = os.environ.get(name)
    if not value:
        return default
    return value.strip() != "0"


def _int(name: str, minimum: int) -> int | None:
    """An integer variable of at least `minimum`; None where it is unset."""
    value = _str(name)
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return n


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


# ---- kernel switches (read once at engine start-up) ---------------------------------------------
def fused() -> bool:
    """ASYNCLLM_FUSED: `0` turns off the Triton fused elementwise kernels on CUDA (default on)."""
    return _flag("ASYNCLLM_FUSED", True)


def cpu_fused() -> bool:
    """ASYNCLLM_CPU_FUSED: `0` turns off the C fused elementwise kernels on the CPU (default on)."""
    return _flag("ASYNCLLM_CPU_FUSED", True)


def cpu_int8_rows() -> int:
    """ASYNCLLM_CPU_INT8_ROWS: the compact GGUF kernel (cpu_weights="quantized") quantizes the
    activations to int8 per block of 32 (llama.cpp's q8) for calls of at most this many rows, on
    a CPU with AVX512-VNNI (default 4); `0` keeps float32 activations everywhere (the exact
    path). Read when a layer's weights are processed at load."""
    n = _int("ASYNCLLM_CPU_INT8_ROWS", 0)
    return 4 if n is None else n


def cpu_attention() -> str:
    """ASYNCLLM_CPU_ATTENTION: `torch` forces the gather + SDPA decode path on the CPU instead of
    the paged C kernel; `auto` (default) uses the kernel where it builds."""
    return (_str("ASYNCLLM_CPU_ATTENTION", "auto") or "auto").lower()


def quant_kernels() -> str:
    """ASYNCLLM_QUANT_KERNELS: `tile` keeps the first quantized kernels below the dequantize
    threshold (the int4/fp8 tile kernel at every batch size, fp8 W8A8 `_scaled_mm` at every
    batch size) for A/B runs; `split` (default) takes the small-batch GEMV/split-K kernels
    (kernels/quant_gemv.py). Read when a layer's weights are processed at load."""
    value = (_str("ASYNCLLM_QUANT_KERNELS", "split") or "split").lower()
    if value not in ("split", "tile"):
        raise ValueError(f"ASYNCLLM_QUANT_KERNELS must be 'split' or 'tile', got {value!r}")
    return value


def decode_attention() -> str:
    """ASYNCLLM_DECODE_ATTENTION: the CUDA decode attention kernel of the `triton` backend:
    `triton-v1` (default: the first round's equal split per sequence), `triton` (the balanced
    split-context kernel: opt-in until measured faster; the one H200 run that reached it had it
    at 0.81-0.86x of v1 at batch 1, NOTES.md) or `fa4` (FlashAttention-4's paged kernel where
    flash_attn.cute imports on a Hopper/Blackwell GPU; else triton, with a warning)."""
    return (_str("ASYNCLLM_DECODE_ATTENTION", "triton-v1") or "triton-v1").lower()


def prefill_attention() -> str:
    """ASYNCLLM_PREFILL_ATTENTION: the CUDA prefill (and mixed-step) attention kernel of the
    `triton` backend: `triton` (default) or `fa4` (as ASYNCLLM_DECODE_ATTENTION)."""
    return (_str("ASYNCLLM_PREFILL_ATTENTION", "triton") or "triton").lower()


def sampler_fused() -> bool:
    """ASYNCLLM_SAMPLER_FUSED: `0` keeps the inverse-CDF draw (cumsum over the vocabulary) for
    rows at temperature on CUDA instead of the one-pass Gumbel-max Triton kernel (default on)."""
    return _flag("ASYNCLLM_SAMPLER_FUSED", True)


def host_fastpath() -> bool:
    """ASYNCLLM_HOST_FASTPATH: `0` turns off the engine's host bookkeeping shortcuts (a decode token
    that fits its sequence's last block skips the allocator; the prefix cache is not asked to
    publish blocks when none was completed; sampler rows carry a request's generated tokens only
    when its sampling reads them). Same results either way; default on."""
    return _flag("ASYNCLLM_HOST_FASTPATH", True)


def detok_fast() -> bool:
    """ASYNCLLM_DETOK_FAST: `0` makes the incremental detokenizer decode its token window for every
    token, instead of appending a token's own text where the tokenizer was checked to decode by
    concatenation (byte-level BPE, word-level). Same text either way; default on."""
    return _flag("ASYNCLLM_DETOK_FAST", True)


def persistent_batch() -> bool:
    """ASYNCLLM_PERSISTENT_BATCH: `0` makes the model runner build each step's inputs from Python
    lists with one pinned copy per tensor, instead of its persistent batch (block-table rows
    written only where they change, the inputs built with numpy into reused staging buffers, two
    copies per step). Same tensors either way. Default on: on the H200 the GPU engine and
    step-message tests pass with it and the 0.6B peer workload gains +1-6% (ops/bench/NOTES.md)."""
    return _flag("ASYNCLLM_PERSISTENT_BATCH", True)


def gc_freeze() -> bool:
    """ASYNCLLM_GC_FREEZE: `0` leaves Python's garbage collector as it is; by default a CUDA engine,
    once built, moves the objects alive then into the collector's permanent generation
    (`gc.freeze()`), so full collections during the steps do not walk them."""
    return _flag("ASYNCLLM_GC_FREEZE", True)


def grammar_threads() -> int | None:
    """ASYNCLLM_GRAMMAR_THREADS: threads xgrammar fills a step's bitmask with (default: one, or
    half the cores this process may use, at most 8, at least 8 rows a thread, whichever fills
    faster per row as measured; grammar.FillThreadChooser). xgrammar's own
    default is half of the host's hardware threads, which on a large host is more than a
    container's share (on the H200 host, 64 rows: 16 threads as slow as 1, 4 threads twice as fast)."""
    return _int("ASYNCLLM_GRAMMAR_THREADS", 1)


def grammar_overlap() -> bool:
    """ASYNCLLM_GRAMMAR_OVERLAP: `0` fills a step's grammar bitmask on the engine's thread, after
    the previous step's host work, instead of on a worker thread beside that work (xgrammar
    releases the GIL while it fills). Same masks and tokens either way. Default off: on the H200
    it gained nothing measurable (ops/bench/NOTES.md, issue 16 third round); `1` turns it on."""
    return _flag("ASYNCLLM_GRAMMAR_OVERLAP", False)


def moe_config() -> str | None:
    """ASYNCLLM_MOE_CONFIG: a JSON table of fused-MoE block sizes by token count (what
    `python -m asyncllm.bench.moe_tune` writes) used instead of the tuned or default tables."""
    return _str("ASYNCLLM_MOE_CONFIG")


# ---- the CPU kernels' build ----------------------------------------------------------------------
def cc() -> str:
    """ASYNCLLM_CC: the C compiler for the CPU kernels (default `gcc`)."""
    return _str("ASYNCLLM_CC", "gcc") or "gcc"


def kernel_cache() -> Path:
    """ASYNCLLM_KERNEL_CACHE: where built CPU kernels are cached
    (default `$XDG_CACHE_HOME/asyncllm/kernels`)."""
    env = _str("ASYNCLLM_KERNEL_CACHE")
    return Path(env) if env else _xdg_cache() / "asyncllm" / "kernels"


# ---- loading -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """ASYNCLLM_CACHE_DIR: asyncllm's own cache (GGUF-derived configs and tokenizers; default
    `$XDG_CACHE_HOME/asyncllm`)."""
    env = _str("ASYNCLLM_CACHE_DIR")
    return Path(env) if env else _xdg_cache() / "asyncllm"


# ---- tensor parallelism -------------------------------------------------------------------------
def tp_cpu_threads() -> int | None:
    """ASYNCLLM_TP_CPU_THREADS: torch threads of each tensor-parallel rank on the CPU (default: the
    cores this process may use, split evenly between the ranks, at least 1)."""
    value = _str("ASYNCLLM_TP_CPU_THREADS")
    return int(value) if value else None


# ---- serving and diagnostics ---------------------------------------------------------------------
def api_keys() -> tuple[str, ...]:
    """ASYNCLLM_API_KEYS: comma-separated API keys the gateway accepts (empty: no auth)."""
    raw = os.environ.get("ASYNCLLM_API_KEYS", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def switch_interval_ms() -> float:
    """ASYNCLLM_SWITCH_INTERVAL_MS: the GIL switch interval `asyncllm serve` sets when the engine
    runs in its own process (default 0.5; Python's own is 5). The engine's sender and receiver
    threads wait up to this long for a busy event loop to let them run; a wave of new requests
    then reached the engine over several steps. A bad value is an error, not ignored."""
    value = os.environ.get("ASYNCLLM_SWITCH_INTERVAL_MS")
    if not value:
        return 0.5
    try:
        ms = float(value)
    except ValueError:
        raise ValueError(
            f"ASYNCLLM_SWITCH_INTERVAL_MS must be a number of ms, got {value!r}"
        ) from None
    if not 0 < ms <= 1000:
        raise ValueError(f"ASYNCLLM_SWITCH_INTERVAL_MS must be in (0, 1000] ms, got {value!r}")
    return ms


def _ms(name: str, default: float, hi: float) -> float:
    """A number of milliseconds in [0, hi]; a bad value is an error, not ignored."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        ms = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of ms, got {value!r}") from None
    if not 0 <= ms <= hi:
        raise ValueError(f"{name} must be in [0, {hi:g}] ms, got {value!r}")
    return ms


def admit_coalesce_ms() -> float:
    """ASYNCLLM_ADMIT_COALESCE_MS: when the engine loop wakes from idle with new requests, how
    long at most it keeps taking commands before its first step (`0`: off, step at once), so a
    wave of requests that reaches it in pieces is admitted in one (mixed, eager) step instead of
    one per piece; it stops earlier after ASYNCLLM_ADMIT_QUIET_MS without a new command. A busy
    engine never waits. See ops/bench/NOTES.md, "Serving, fifth round"."""
    return _ms("ASYNCLLM_ADMIT_COALESCE_MS", 0.0, 1000.0)


def admit_quiet_ms() -> float:
    """ASYNCLLM_ADMIT_QUIET_MS: within ASYNCLLM_ADMIT_COALESCE_MS's window, the gap without a new
    command after which the engine loop stops waiting and steps (default 0.3; a lone request
    waits this long)."""
    return _ms("ASYNCLLM_ADMIT_QUIET_MS", 0.3, 1000.0)


def profile_dir() -> str | None:
    """ASYNCLLM_PROFILE_DIR: when set, cProfile the engine loop, the engine process's receiver and
    the gateway's event loop into `.pstats` files there."""
    return _str("ASYNCLLM_PROFILE_DIR")


# ---- clients, examples and benchmarks ------------------------------------------------------------
def api_key() -> str | None:
    """ASYNCLLM_API_KEY: the key examples and benchmarks send to a gateway."""
    return _str("ASYNCLLM_API_KEY")


def url(default: str = "ws://127.0.0.1:8000/v1/ws") -> str:
    """ASYNCLLM_URL: the gateway the example bot connects to."""
    return _str("ASYNCLLM_URL", default) or default


def bench_dir() -> Path:
    """ASYNCLLM_BENCH_DIR: benchmarks' scratch directory (default `/tmp/asyncllm-bench`)."""
    return Path(_str("ASYNCLLM_BENCH_DIR", "/tmp/asyncllm-bench") or "/tmp/asyncllm-bench")


def bench_threads(default: int = 2) -> int:
    """ASYNCLLM_BENCH_THREADS: torch threads of the CPU benchmarks (default 2)."""
    return int(_str("ASYNCLLM_BENCH_THREADS") or default)


def commit() -> str | None:
    """ASYNCLLM_COMMIT: the commit benchmark results record where the tree has no `.git`."""
    return _str("ASYNCLLM_COMMIT")


def peer_path() -> str | None:
    """ASYNCLLM_PEER_PATH: the peer engine's checkout for `asyncllm bench peer`."""
    return _str("ASYNCLLM_PEER_PATH")


VARIABLES = {
    "ASYNCLLM_FUSED": fused,
    "ASYNCLLM_CPU_FUSED": cpu_fused,
    "ASYNCLLM_CPU_INT8_ROWS": cpu_int8_rows,
    "ASYNCLLM_CPU_ATTENTION": cpu_attention,
    "ASYNCLLM_QUANT_KERNELS": quant_kernels,
    "ASYNCLLM_DECODE_ATTENTION": decode_attention,
    "ASYNCLLM_PREFILL_ATTENTION": prefill_attention,
    "ASYNCLLM_SAMPLER_FUSED": sampler_fused,
    "ASYNCLLM_HOST_FASTPATH": host_fastpath,
    "ASYNCLLM_DETOK_FAST": detok_fast,
    "ASYNCLLM_GC_FREEZE": gc_freeze,
    "ASYNCLLM_GRAMMAR_THREADS": grammar_threads,
    "ASYNCLLM_GRAMMAR_OVERLAP": grammar_overlap,
    "ASYNCLLM_PERSISTENT_BATCH": persistent_batch,
    "ASYNCLLM_MOE_CONFIG": moe_config,
    "ASYNCLLM_CC": cc,
    "ASYNCLLM_KERNEL_CACHE": kernel_cache,
    "ASYNCLLM_CACHE_DIR": cache_dir,
    "ASYNCLLM_TP_CPU_THREADS": tp_cpu_threads,
    "ASYNCLLM_API_KEYS": api_keys,
    "ASYNCLLM_PROFILE_DIR": profile_dir,
    "ASYNCLLM_SWITCH_INTERVAL_MS": switch_interval_ms,
    "ASYNCLLM_ADMIT_COALESCE_MS": admit_coalesce_ms,
    "ASYNCLLM_ADMIT_QUIET_MS": admit_quiet_ms,
    "ASYNCLLM_API_KEY": api_key,
    "ASYNCLLM_URL": url,
    "ASYNCLLM_BENCH_DIR": bench_dir,
    "ASYNCLLM_BENCH_THREADS": bench_threads,
    "ASYNCLLM_COMMIT": commit,
    "ASYNCLLM_PEER_PATH": peer_path,
}
