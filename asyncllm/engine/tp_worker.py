"""A tensor-parallel rank other than 0: `python -m asyncllm.engine.tp_worker MSG REPORT LIFELINE`
(three inherited pipe fds), started by tp_executor.WorkerGroup.

It reads its WorkerSpec from MSG, says hello on REPORT once its imports are done, joins the
group, builds its own runner (its shard of every weight, its KV cache, its CUDA graphs) with the
same code as rank 0, then runs every step message that comes down MSG through that runner. It
holds no scheduler or request state and samples nothing; the logits it computes (the all-gather
needs every rank) are dropped. An empty message stops it (exit 0). If anything fails it reports the error
and exits; if rank 0's process dies (LIFELINE reaches EOF) it exits at once.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any


def _watch_lifeline(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(1)  # rank 0 is gone: nothing here is worth finishing


def _report_failure(reports: Connection, e: BaseException) -> None:
    traceback.print_exc()
    try:
        reports.send(("failed", e))
    except Exception:  # an exception that does not pickle
        try:
            reports.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


def main(argv: list[str]) -> None:
    msg_fd, rep_fd, life_fd = (int(a) for a in argv)
    # Ctrl-C in a terminal reaches the whole process group: rank 0 decides when ranks stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_lifeline, args=(life_fd,), daemon=True).start()
    msgs = Connection(msg_fd, writable=False)
    reports = Connection(rep_fd, readable=False)
    try:
        spec = pickle.loads(msgs.recv_bytes())
        logging.basicConfig(
            level=logging.WARNING,
            format=f"%(asctime)s %(levelname)s tp rank {spec.rank}: %(name)s: %(message)s",
        )
        import torch

        from asyncllm.engine import distributed
        from asyncllm.engine.engine_builder import build_runner

        if spec.cpu_threads is not None:
            torch.set_num_threads(spec.cpu_threads)
        reports.send(("hello", os.getpid()))
        store = torch.distributed.TCPStore("127.0.0.1", spec.store_port, spec.size, is_master=False)
        device = spec.model_config.device
        distributed.init_tensor_parallel(spec.rank, spec.size, device, store)
        torch.manual_seed(spec.args.seed)
        _, _, runner = build_runner(spec.args, spec.model_config)
        run_steps(msgs, runner, device)
    except BaseException as e:  # noqa: BLE001 - everything goes to rank 0
        _report_failure(reports, e)
        sys.stderr.flush()
        os._exit(1)  # not a clean exit: NCCL teardown with a broken group can hang
    sys.stdout.flush()
    sys.stderr.flush()
    # No process-group teardown and no interpreter teardown: the first can hang on NCCL after
    # graph capture (pytorch/pytorch#115388), the second takes seconds of torch's modules on a
    # loaded machine; the process holds nothing the OS does not release.
    os._exit(0)


def run_steps(msgs: Connection, runner: Any, device: Any) -> None:
    """Until the empty message: each step's message through this rank's runner."""
    import torch

    from asyncllm.engine import distributed

    while True:
        data = msgs.recv_bytes()
        if not data:
            return
        step, n_prev = pickle.loads(data)
        prev = None
        if n_prev >= 0:  # async scheduling: the in-flight step's sampled ids, from rank 0
            prev = distributed.broadcast(torch.empty(n_prev, dtype=torch.int64, device=device))
        runner.execute(step, prev)


if __name__ == "__main__":
    main(sys.argv[1:])
