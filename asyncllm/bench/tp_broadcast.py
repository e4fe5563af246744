"""Host cost of broadcasting the step message to tensor-parallel ranks (CPU, no model):
rank 0 pickles each step's message once (what tp_executor.MultiprocExecutor sends) and writes the
same bytes to every worker's pipe; each reader process takes it off its pipe and unpickles it.
Timed: the pickle, the writes (all ranks), and the delay until the last rank holds the message;
beside them what a pickle per rank would cost. Messages are a real scheduler's at a decode batch
(the first one, the prefill, carries every prompt whole).

    python -m asyncllm.bench.tp_broadcast [--ranks 8] [--batch 256] [--prompt 512]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection


def _reader(msg_fd: int, rep_fd: int) -> None:
    msgs = Connection(msg_fd, writable=False)
    reports = Connection(rep_fd, readable=False)
    import asyncllm.engine.step_message  # noqa: F401 - what unpickling needs, imported now

    reports.send("ready")
    done: list[float] = []
    while True:
        data = msgs.recv_bytes()
        if not data:
            break
        pickle.loads(data)
        done.append(time.perf_counter())  # CLOCK_MONOTONIC: the same clock in every process
    reports.send(done)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reader", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.reader:
        _reader(*a.reader)
        return
    from asyncllm.bench.step_message import decode_scheduler  # torch: not in the readers

    sched = decode_scheduler(a.batch, a.prompt, a.block_size, a.steps)
    readers = []
    for _ in range(a.ranks - 1):
        msg_r, msg_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cmd = [
            sys.executable,
            "-m",
            "asyncllm.bench.tp_broadcast",
            "--reader",
            str(msg_r),
            str(rep_w),
        ]
        proc = subprocess.Popen(cmd, pass_fds=(msg_r, rep_w))
        os.close(msg_r)
        os.close(rep_w)
        readers.append((proc, Connection(msg_w, readable=False), Connection(rep_r, writable=False)))
    for _, _, reports in readers:
        assert reports.recv() == "ready"
    pickle_s, send_s, sizes, started, per_rank_pickle_s = [], [], [], [], []
    for _ in range(a.steps + 1):
        out = sched.schedule()
        t0 = time.perf_counter()
        blob = pickle.dumps((out.step, -1), protocol=pickle.HIGHEST_PROTOCOL)
        t1 = time.perf_counter()
        for _, conn, _ in readers:
            conn.send_bytes(blob)
        t2 = time.perf_counter()
        for _ in readers:  # what a pickle per rank would have cost instead
            pickle.dumps((out.step, -1), protocol=pickle.HIGHEST_PROTOCOL)
        per_rank_pickle_s.append(time.perf_counter() - t2)
        started.append(t0)
        pickle_s.append(t1 - t0)
        send_s.append(t2 - t1)
        sizes.append(len(blob))
        for item in out.scheduled:  # the engine's part: computed tokens, a sampled token
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.token_ids.append(7)
        time.sleep(0.002)  # a step's forward: the readers are waiting when the next one comes
    arrivals = []
    for proc, conn, reports in readers:
        conn.send_bytes(b"")
        arrivals.append(reports.recv())
        proc.wait()
    latest = [max(r[i] for r in arrivals) - started[i] for i in range(len(started))]

    def us(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1e6:8.1f} us, min {min(xs) * 1e6:8.1f} us"

    print(f"{a.ranks} ranks, decode batch {a.batch}, context {a.prompt}+, block {a.block_size}")
    print(f"  prefill message: {sizes[0]} bytes, pickle {pickle_s[0] * 1e6:.0f} us,")
    print(f"    writes {send_s[0] * 1e6:.0f} us, last rank has it after {latest[0] * 1e6:.0f} us")
    d = slice(1, None)
    print(f"  decode messages: {statistics.median(sizes[d]):.0f} bytes")
    print(f"    pickle once                      {us(pickle_s[d])}")
    print(f"    write to {a.ranks - 1} pipes                  {us(send_s[d])}")
    print(f"    last rank holds it (unpickled)   {us(latest[d])}")
    print(f"    ({a.ranks - 1} pickles instead of one: {us(per_rank_pickle_s[d])})")


if __name__ == "__main__":
    main()
