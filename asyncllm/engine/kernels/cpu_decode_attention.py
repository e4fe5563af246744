"""Paged decode attention on the CPU (float32), reading the paged KV cache in place.

The torch backend's decode path gathers every sequence's KV blocks into a padded copy (one
`index_select` per layer per step) and runs a masked SDPA over it; on the CPU benchmark that was
~24% of the time. This kernel (`cpu_decode_attention.c`, next to this file) reads each sequence's
blocks where they are, once, for all query heads of a KV head (GQA), OpenMP-parallel over
(sequence, KV head).

It is compiled at first use with the system C compiler (`gcc`, or `$ASYNCLLM_CC`) and loaded with
ctypes: no torch headers, about a second. The built library is cached in
`$ASYNCLLM_KERNEL_CACHE` (default `$XDG_CACHE_HOME/asyncllm/kernels`, i.e. `~/.cache/...`) under
a hash of the source, compiler, flags, CPU flags and OpenMP runtime; it is built to a temporary
file and renamed, so processes building at once do not race. It links against the OpenMP runtime
torch already loaded (the CPU wheel bundles its own libgomp): one thread pool, shared with
torch's intra-op threads, instead of two fighting over the cores.

No compiler, a failed build or `ASYNCLLM_CPU_ATTENTION=torch`: `decode()` returns None and the
caller uses the torch path (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11", "-Wall"]
SYMBOL = "asyncllm_paged_decode_attention_f32"

_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """False when `ASYNCLLM_CPU_ATTENTION=torch` forces the torch path (read on every call, so
    an A/B in one process can flip it)."""
    return os.environ.get("ASYNCLLM_CPU_ATTENTION", "auto").lower() != "torch"


def compiler() -> str:
    return os.environ.get("ASYNCLLM_CC") or "gcc"


def cache_dir() -> Path:
    env = os.environ.get("ASYNCLLM_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncllm" / "kernels"


def openmp_runtime() -> str | None:
    """The OpenMP runtime this process already has mapped (torch's), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return path
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, out_dir: Path) -> Path:
    """The cached library, built if missing. Raises on any failure."""
    cc_path = shutil.which(cc)
    if cc_path is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found")
    omp = openmp_runtime()
    # Compile with -fopenmp (pragmas), but link the runtime torch loaded, by path, not the
    # compiler's own -lgomp: a second runtime would start a second thread pool.
    link = [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else ["-fopenmp"]
    src = SOURCE.read_bytes()
    key = hashlib.sha256()
    for part in (src, cc_path, str(os.stat(cc_path).st_mtime_ns), " ".join(CFLAGS), str(link)):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    key.update(_cpu_flags().encode())
    key.update(platform.machine().encode())
    target = out_dir / f"cpu_decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        obj, so = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for cmd in (
            [cc, *CFLAGS, "-c", str(SOURCE), "-o", str(obj)],
            [cc, "-shared", str(obj), *link, "-o", str(so)],
        ):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
        os.replace(so, target)  # atomic: a concurrent builder's identical file may be replaced
    return target


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; None (logged once) if that fails."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        path = _build(compiler(), cache_dir())
        lib = ctypes.CDLL(str(path))
        fn = getattr(lib, SYMBOL)
    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
        logger.info("CPU paged decode attention unavailable, using the torch path: %s", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p, p, i64, i64, p, p, i64, i32, p, i32, i32, i32, i32, i32, i64]
    fn.argtypes += [ctypes.c_float, i32]
    fn.restype = ctypes.c_int
    _lib = lib
    logger.debug("CPU paged decode attention loaded from %s", path)
    return _lib


def reset() -> None:
    """Forget the loaded library (tests: rebuild under another compiler or cache dir)."""
    global _lib, _tried
    _lib, _tried = None, False


def usable(q: Tensor, kv_cache: Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and kv_cache.device.type == "cpu"
        and enabled()
    )


def decode(
    q: Tensor, kv_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float
) -> Tensor | None:
    """q [B,Hq,D] (one new token per sequence) against each sequence's first seq_lens[b] cached
    tokens -> [B,Hq,D]; None when the kernel is not available (use the torch path). Rows with
    seq_len 0 (padding) come out as zeros."""
    lib = load() if enabled() else None
    if lib is None:
        return None
    batch, hq, d = q.shape
    _, num_blocks, block_size, hkv, dk = kv_cache.shape
    if dk != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError("block_tables and seq_lens need one row per query")
    out = torch.empty(batch, hq, d, dtype=torch.float32)
    if batch == 0:
        return out
    bad = lib.asyncllm_paged_decode_attention_f32(
        out.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        kv_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        block_tables.shape[1],
        seq_lens.data_ptr(),
        batch,
        hq,
        hkv,
        d,
        block_size,
        num_blocks,
        scale,
        torch.get_num_threads(),
    )
    if bad:
        raise RuntimeError(
            f"CPU decode attention: {bad} (sequence, kv head) items had a block id outside "
            f"[0, {num_blocks}) (or a scratch allocation failed)"
        )
    return out
