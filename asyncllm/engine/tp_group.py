"""The processes of a tensor-parallel engine, seen from rank 0 (this process): ranks 1..N-1 are
fresh interpreters (`python -m asyncllm.engine.tp_worker`, the spawn start method's semantics)
started with subprocess rather than multiprocessing: the engine may itself run in a daemonic
multiprocessing child (EngineArgs.engine_process), which multiprocessing forbids to have
children, and user scripts need no `__main__` guard. Rank 0 hosts the TCPStore they meet at.

Each worker has three pipes: its messages (the spec, then one step message per step; b"" stops
it), its reports ("hello" once imported, "failed" with its error), and a lifeline whose write end
only this process holds: if this process dies, every worker exits.

A monitor thread watches every report pipe. A worker that dies (EOF) or reports an error fails
the group: the NCCL communicators are aborted (a collective blocked on the dead rank returns
with an error; gloo's do so by themselves), the other workers are killed, and the failure
callbacks run (they end the engine: EngineDeadError on every stream, within about a second).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from asyncllm import envs
from asyncllm.config import EngineArgs, ModelConfig
from asyncllm.engine import distributed

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 300.0  # a worker's interpreter start and imports (torch, transformers)
JOIN_TIMEOUT_S = 120.0  # joining the process group once every worker said hello
STOP_TIMEOUT_S = 10.0  # a stopped worker exits at once; then it is killed


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot go on."""


@dataclass
class WorkerSpec:
    """What a worker needs to become rank `rank` (sent pickled as its first message)."""

    args: EngineArgs
    model_config: ModelConfig  # with this rank's device
    rank: int
    size: int
    store_port: int
    cpu_threads: int | None  # torch threads on the CPU (None: leave torch's default)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def cpu_threads_per_rank(tp: int) -> int:
    set_by_user = envs.tp_cpu_threads()
    if set_by_user is not None:
        return max(1, set_by_user)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // tp)


def _package_root() -> str:
    import asyncllm

    return str(Path(asyncllm.__file__).resolve().parent.parent)


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    msgs: Connection  # write end: the spec, then one message per step (b"": stop)
    reports: Connection  # read end: ("hello" | "failed", payload)
    lifeline: int  # write-end fd, never written: its closing (our death) ends the worker
    hello: bool = False


def _release(workers: list[_Worker], in_group: list[bool]) -> None:
    """The end of a group, also the last resort (garbage collection, interpreter exit): no worker
    outlives this process's engine, and this process leaves the group, so another engine can
    form one."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
    for w in workers:
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for close in (w.msgs.close, w.reports.close, lambda w=w: os.close(w.lifeline)):
            try:
                close()
            except OSError:
                pass
    workers.clear()
    if in_group and in_group.pop():
        try:
            distributed.destroy_tensor_parallel()
        except Exception:  # noqa: BLE001 - e.g. NCCL after an abort
            logger.exception("leaving the tensor-parallel group failed")


class WorkerGroup:
    """Ranks 1..N-1 as processes, and this process joined to their group as rank 0."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig):
        self.size = args.tensor_parallel_size
        self.args = args
        self.model_config = model_config
        self.workers: list[_Worker] = []
        self.failure: str | None = None
        self.error: BaseException | None = None  # a worker's own exception, when it sent one
        self._failed = threading.Event()
        self._hello = threading.Condition()
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._stop_r, self._stop_w = os.pipe()
        self._monitor: threading.Thread | None = None
        self._threads_before: int | None = None
        self._in_group: list[bool] = []  # [True] once this process joined (for the finalizer)
        self._finalizer = weakref.finalize(self, _release, self.workers, self._in_group)

    # ---- start ------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the workers, wait for each to say hello, join the group as rank 0."""
        import torch.distributed as dist

        distributed.disable_nvlink_multicast()
        device = self.model_config.device
        if device.type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} GPUs; "
                f"{torch.cuda.device_count()} are visible"
            )
        threads = cpu_threads_per_rank(self.size) if device.type == "cpu" else None
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            self.size,
            is_master=True,
            timeout=_timedelta(JOIN_TIMEOUT_S),
            wait_for_workers=False,
        )
        try:
            for rank in range(1, self.size):
                spec = WorkerSpec(
                    self.args,
                    dataclasses.replace(self.model_config, device=rank_device(device, rank)),
                    rank,
                    self.size,
                    store.port,
                    threads,
                )
                self.workers.append(self._spawn(spec))
            self._monitor = threading.Thread(
                target=self._watch, name="asyncllm-tp-monitor", daemon=True
            )
            self._monitor.start()
            self._wait_for_hellos()
            if threads is not None:
                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(threads)
            distributed.init_tensor_parallel(0, self.size, device, store, self._timeout_s())
            self._in_group.append(True)
        except BaseException:
            self.shutdown()
            raise
        self._store = store  # rank 0 hosts it: it lives as long as the group
        logger.info(
            "tensor parallel: %d ranks (%s), workers %s",
            self.size,
            distributed.tp_backend(),
            [w.proc.pid for w in self.workers],
        )

    def _timeout_s(self) -> float:
        # A collective waits this long at most (gloo; NCCL's are aborted by the monitor first).
        return 1800.0

    def _spawn(self, spec: WorkerSpec) -> _Worker:
        msg_r, msg_w = os.pipe()
        rep_r, rep_w = os.pipe()
        life_r, life_w = os.pipe()
        env = dict(os.environ)
        distributed.disable_nvlink_multicast(env)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if spec.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(spec.cpu_threads)
        cmd = [sys.executable, "-m", "asyncllm.engine.tp_worker", str(msg_r), str(rep_w)]
        cmd.append(str(life_r))
        try:
            proc = subprocess.Popen(
                cmd, pass_fds=(msg_r, rep_w, life_r), env=env, stdin=subprocess.DEVNULL
            )
        finally:
            for fd in (msg_r, rep_w, life_r):  # the child's ends
                os.close(fd)
        worker = _Worker(
            spec.rank,
            proc,
            Connection(msg_w, readable=False),
            Connection(rep_r, writable=False),
            life_w,
        )
        worker.msgs.send_bytes(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        return worker

    def _wait_for_hellos(self) -> None:
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        with self._hello:
            while not all(w.hello for w in self.workers) and self.failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TensorParallelError(
                        f"tensor-parallel workers did not start in {HELLO_TIMEOUT_S:.0f} s"
                    )
                self._hello.wait(min(left, 1.0))
        self.raise_if_failed()

    # ---- failure ------------------------------------------------------------------------------
    def _watch(self) -> None:
        by_conn = {w.reports: w for w in self.workers}
        while by_conn:
            ready = wait([*by_conn, self._stop_r])
            if self._stop_r in ready:
                return
            for conn in ready:
                w = by_conn[conn]  # type: ignore[index]
                try:
                    kind, payload = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    del by_conn[conn]  # type: ignore[arg-type]
                    if not self._stopping:
                        code = _exit_code(w.proc)
                        self._fail(f"tensor-parallel rank {w.rank} died (exit code {code})")
                    continue
                if kind == "hello":
                    with self._hello:
                        w.hello = True
                        self._hello.notify_all()
                elif kind == "failed":
                    error = payload if isinstance(payload, BaseException) else None
                    self._fail(f"tensor-parallel rank {w.rank} failed: {payload}", error)

    def _fail(self, message: str, error: BaseException | None = None) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure, self.error = message, error
            callbacks = list(self._callbacks)
        logger.error("asyncllm: %s; stopping every rank", message)
        self._failed.set()
        with self._hello:
            self._hello.notify_all()
        try:
            distributed.abort_tensor_parallel()  # NCCL: a blocked collective returns
        except Exception:  # noqa: BLE001 - the group is being torn down anyway
            logger.exception("aborting the NCCL communicators failed")
        for w in self.workers:  # a group with a dead rank is no use to the others
            if w.proc.poll() is None:
                w.proc.kill()
        for cb in callbacks:
            cb(message)

    def add_failure_callback(self, cb: Callable[[str], None]) -> None:
        """`cb(message)` once, from the monitor thread, when a rank fails (now if one has)."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._callbacks.append(cb)
        if failure is not None:
            cb(failure)

    def raise_if_failed(self, wait_s: float = 0.0) -> None:
        """TensorParallelError if a rank failed (waiting up to `wait_s` for the monitor to see
        it: an error from a collective comes before the EOF of the rank that caused it)."""
        if wait_s and not self._failed.wait(wait_s):
            return
        if self.failure is not None:
            err = TensorParallelError(self.failure)
            if self.error is not None:
                raise err from self.error
            raise err

    # ---- steps --------------------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        """The same bytes down every worker's pipe."""
        for w in self.workers:
            w.msgs.send_bytes(payload)

    # ---- stop ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every worker (kill what does not exit in time), leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = self._stopping = True
        for w in self.workers:
            try:
                w.msgs.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel rank %d did not exit; killing it", w.rank)
        os.write(self._stop_w, b"x")
        if self._monitor is not None:
            self._monitor.join(5)
        self._finalizer()  # kills stragglers, closes the pipes, leaves the group
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]


def _exit_code(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return None


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)
