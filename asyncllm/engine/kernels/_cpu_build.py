"""Build, cache and load the small C kernels of the CPU path (ctypes, no torch headers).

Each kernel library is one C file next to its Python module. It is compiled at first use with
the system C compiler (`gcc`, or `$ASYNCLLM_CC`) and loaded with ctypes: about a second. The
built library is cached in `$ASYNCLLM_KERNEL_CACHE` (default `$XDG_CACHE_HOME/asyncllm/kernels`,
i.e. `~/.cache/...`) under a hash of the source, compiler, flags, CPU flags and OpenMP runtime; it
is built to a temporary file and renamed, so processes building at once do not race. It links
against the OpenMP runtime torch already loaded (the CPU wheel bundles its own libgomp): one
thread pool, shared with torch's intra-op threads, instead of two fighting over the cores.

`CLibrary.load()` returns None (logged once) without a compiler or when the build fails; the
callers then use their torch path.
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
from collections.abc import Callable, Sequence
from pathlib import Path

from asyncllm import envs

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11", "-Wall"]


def compiler() -> str:
    return envs.cc()


def cache_dir() -> Path:
    return envs.kernel_cache()


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


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build(source: Path, cc: str, out_dir: Path, cflags: Sequence[str] = CFLAGS) -> Path:
    """The cached library built from `source`, built if missing. Raises on any failure."""
    cc_path = shutil.which(cc)
    if cc_path is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found")
    omp = openmp_runtime()
    # Compile with -fopenmp (pragmas), but link the runtime torch loaded, by path, not the
    # compiler's own -lgomp: a second runtime would start a second thread pool.
    link = [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else ["-fopenmp"]
    src = source.read_bytes()
    key = hashlib.sha256()
    for part in (src, cc_path, str(os.stat(cc_path).st_mtime_ns), " ".join(cflags), str(link)):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    key.update(cpu_flags().encode())
    key.update(platform.machine().encode())
    target = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        obj, so = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for cmd in (
            [cc, *cflags, "-c", str(source), "-o", str(obj)],
            [cc, "-shared", str(obj), *link, "-o", str(so)],
        ):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
        os.replace(so, target)  # atomic: a concurrent builder's identical file may be replaced
    return target


class CLibrary:
    """One C kernel library, built and loaded at the first `load()`; `declare(lib)` sets the
    ctypes signatures (and raises if a symbol is missing). A failure is logged once, as
    "<what> unavailable, using the torch path", and `load()` keeps returning None."""

    def __init__(
        self,
        source: Path,
        what: str,
        declare: Callable[[ctypes.CDLL], None],
        logger: logging.Logger,
        cflags: Sequence[str] = CFLAGS,
    ):
        self.source = source
        self.what = what
        self.declare = declare
        self.logger = logger
        self.cflags = list(cflags)
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def build(self, cc: str, out_dir: Path) -> Path:
        return build(self.source, cc, out_dir, self.cflags)

    def load(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        self._tried = True
        try:
            path = self.build(compiler(), cache_dir())
            lib = ctypes.CDLL(str(path))
            self.declare(lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
            self.logger.info("%s unavailable, using the torch path: %s", self.what, e)
            return None
        self._lib = lib
        self.logger.debug("%s loaded from %s", self.what, path)
        return lib

    def reset(self) -> None:
        """Forget the loaded library (tests: rebuild under another compiler or cache dir)."""
        self._lib, self._tried = None, False
