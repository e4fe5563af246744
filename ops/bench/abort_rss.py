"""Needs a checkout (it serves through tests/gateway_helpers): `python -m ops.bench.abort_rss` from the repository root.
Does the server leak across abort storms? RSS and Python heap (tracemalloc) over many rounds.

Each round opens `--sockets` WebSockets to an in-process gateway on 127.0.0.1, starts
`--streams` streams on each, waits for first tokens, then half the sockets cancel every stream
and the other half just drop (their streams run detached until the resume TTL cancels them),
and waits until the engine is idle with every KV block free. Printed per round: RSS, the
traced Python heap, engine state; at the end, the allocation sites that grew most between the
warm-up round and the last (tracemalloc, 25 frames).

    python -m ops.bench.abort_rss --model /path/to/model --rounds 50
    python -m ops.bench.abort_rss --rounds 50            # the default model
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc

import orjson
import psutil


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _malloc_trim() -> None:
    """glibc keeps freed memory in its arenas; trimming shows what is really still in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> dict[str, float]:
    """glibc's own view (mallinfo2, every arena): `in_use` is what the program holds through
    malloc, `free` what malloc holds without returning it (fragmentation), `mmap` the large
    blocks it maps directly. A leak through malloc grows `in_use`; arena fragmentation `free`."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    mib = 2**20
    return {
        "malloc_in_use_mib": round(m.uordblks / mib, 1),
        "malloc_free_mib": round(m.fordblks / mib, 1),
        "malloc_mmap_mib": round(m.hblkhd / mib, 1),
        "malloc_arena_mib": round(m.arena / mib, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--sockets", type=int, default=8)
    ap.add_argument("--streams", type=int, default=8, help="per socket")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--kv-cache-mib", type=int, default=None, help="KV cache size (default: the engine's)"
    )
    ap.add_argument("--warmup", type=int, default=5, help="rounds before the baseline snapshot")
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--json", default=None, help="write the per-round numbers here")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.getcwd())
    from websockets.sync.client import connect

    from asyncllm import AsyncLLMEngine, EngineArgs
    from asyncllm.gateway import GatewaySettings
    from tests.gateway_helpers import run_server

    kv = args.kv_cache_mib << 20 if args.kv_cache_mib else None
    eargs = EngineArgs(model=args.model, seed=0, kv_cache_memory=kv)
    engine = AsyncLLMEngine.from_engine_args(eargs)
    settings = GatewaySettings(resume_ttl=0.5, max_streams_per_connection=256)
    rows = []
    baseline = None
    cfg = engine.engine.cache_config if hasattr(engine, "engine") else None
    print(json.dumps({"kv_cache_mib": args.kv_cache_mib, "cache_config": str(cfg)}), flush=True)
    with run_server(engine, settings, start_timeout=600) as srv:
        if not args.no_tracemalloc:  # after start-up: only what the rounds allocate is traced
            tracemalloc.start(25)

        def storm(i: int, drop: bool) -> None:
            ws = connect(srv.ws_url(), open_timeout=30, max_size=None)
            ws.recv(timeout=30)  # session
            for k in range(args.streams):
                frame = {
                    "type": "complete",
                    "id": k,
                    "prompt": f"Round {i}: tell me a long story about number {k}.",
                    "params": {"max_tokens": args.max_tokens, "ignore_eos": True},
                }
                ws.send(orjson.dumps(frame).decode())
            seen: set[int] = set()
            deadline = time.monotonic() + 120
            while len(seen) < args.streams and time.monotonic() < deadline:
                f = orjson.loads(ws.recv(timeout=120))
                if f.get("type") == "delta":
                    seen.add(f["id"])
            if not drop:
                for k in range(args.streams):
                    ws.send(orjson.dumps({"type": "cancel", "id": k}).decode())
                done: set[int] = set()
                while len(done) < args.streams and time.monotonic() < deadline:
                    f = orjson.loads(ws.recv(timeout=120))
                    if f.get("type") == "done":
                        done.add(f["id"])
            ws.close()

        def idle() -> bool:
            s = engine.stats()
            return (
                s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total
            )

        for r in range(args.rounds):
            t0 = time.monotonic()
            threads = [
                threading.Thread(target=storm, args=(r, j % 2 == 1)) for j in range(args.sockets)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            deadline = time.monotonic() + 60
            while not idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.6)  # the reaper's pass after the TTL
            gc.collect()
            rss_before_trim = _rss_mib()
            _malloc_trim()
            row = {
                "round": r,
                "seconds": round(time.monotonic() - t0, 2),
                "rss_mib": round(rss_before_trim, 1),
                "rss_trimmed_mib": round(_rss_mib(), 1),
                "idle": idle(),
                "sessions": len(srv.app.state.sessions.sessions),
                "threads": psutil.Process().num_threads(),
                **_mallinfo(),
            }
            if tracemalloc.is_tracing():
                cur, peak = tracemalloc.get_traced_memory()
                row["traced_mib"] = round(cur / 2**20, 2)
                if r == args.warmup - 1:
                    baseline = tracemalloc.take_snapshot()
            rows.append(row)
            print(json.dumps(row), flush=True)
    if baseline is not None:
        last = tracemalloc.take_snapshot()
        print("top growth since the warm-up round (tracemalloc, by traceback):")
        for stat in last.compare_to(baseline, "traceback")[:8]:
            print(f"  {stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
            for line in stat.traceback.format()[-6:]:
                print("     ", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
