"""`asyncllm serve | chat | bench`.

serve: the gateway (WebSocket /v1/ws, OpenAI HTTP, /metrics, /health, the chat page at /) on
uvicorn; the engine loads in the app's lifespan and shuts down with it (Ctrl-C is clean).
chat: an interactive terminal chat on the engine, no server.
bench: the benchmark suite (asyncllm.bench: throughput, latency, cpu, serving).
Every EngineArgs field is a flag of serve and chat (generated from the dataclass).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from asyncllm import envs
from asyncllm.cli_flags import (
    HelpFormatter,
    add_engine_args,
    add_serve_parser,
)
from asyncllm.config import EngineArgs

logger = logging.getLogger("asyncllm")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    kw = {k[len("engine_") :]: v for k, v in vars(ns).items() if k.startswith("engine_")}
    return EngineArgs(model=ns.model, **kw)


def serve_engine_args(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs for `asyncllm serve`: with no --[no-]engine-process, the engine loop runs in
    its own process on a GPU. There the engine's per-step work is Python that would share the
    GIL with the server's event loop; on the H200 at 256 streams the gateway delivered 38.4k
    tok/s with the engine in a process against 21.9k with the engine thread (ops/bench/NOTES.md).
    On the CPU the model is the bottleneck and the thread costs less."""
    args = engine_args_from(ns)
    if "engine_engine_process" not in vars(ns):
        args.engine_process = _on_cuda(args.device)
    return args


def _on_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return device == "cuda" or torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    from asyncllm import __version__
    from asyncllm.gateway.settings import GatewaySettings

    gs = GatewaySettings()
    p = argparse.ArgumentParser(prog="asyncllm", description="asyncllm: serve, chat, bench")
    p.add_argument("--version", action="version", version=f"asyncllm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    add_serve_parser(sub, gs, cmd_serve)

    c = sub.add_parser(
        "chat",
        help="interactive terminal chat on the engine",
        description="A terminal chat on the engine, no server. Ctrl-C stops an answer; at the "
        "prompt it quits. /system TEXT, /reset, /exit.",
        formatter_class=HelpFormatter,
    )
    c.add_argument(
        "model", nargs="?", default=None, help="as for serve (default: the default model)"
    )
    c.add_argument(
        "--max-tokens", type=int, default=512, metavar="TOKENS", help="longest answer, in tokens"
    )
    c.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)"
    )
    c.add_argument("--system", default=None, help="a system prompt (default: none)")
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser(
        "bench",
        help="benchmarks: throughput, latency, cpu, serving (asyncllm bench --help)",
        add_help=False,
    )
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def settings_from(ns: argparse.Namespace) -> Any:
    from asyncllm.gateway.settings import GatewaySettings, api_keys_from_env

    keys = tuple(dict.fromkeys([*ns.api_key, *api_keys_from_env()]))
    kw: dict[str, Any] = {}
    if ns.ui_file is not None:
        kw["ui_file"] = ns.ui_file
    return GatewaySettings(
        host=ns.host,
        port=ns.port,
        api_keys=keys,
        allowed_origins=tuple(ns.allowed_origin),
        allowed_hosts=tuple(ns.allowed_host) if ns.allowed_host else None,
        resume_ttl=ns.resume_ttl,
        max_frame_bytes=ns.max_frame_bytes,
        max_streams_per_connection=ns.max_streams_per_connection,
        max_connections=ns.max_connections,
        max_prompt_tokens=ns.max_prompt_tokens,
        max_queue=ns.max_queue,
        replay_buffer_bytes=ns.replay_buffer_bytes,
        finished_streams_kept=ns.finished_streams_kept,
        retry_after=ns.retry_after,
        shutdown_timeout=ns.shutdown_timeout,
        ws_ping_interval=ns.ws_ping_interval,
        ws_ping_timeout=ns.ws_ping_timeout,
        ui=not ns.no_ui,
        tool_call_parser=ns.tool_call_parser,
        max_tokens_default=ns.max_tokens_default,
        metrics_public=ns.metrics_public,
        freeze_gc=True,  # `asyncllm serve` owns its process
        **kw,
    )


def cmd_serve(ns: argparse.Namespace) -> int:

    from asyncllm.gateway import GatewayServer, build_app, uvicorn_config

    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = settings_from(ns)
        # the port first: a busy one is known in milliseconds, not after the model has loaded
        sock = _listen_socket(settings.host, settings.port)
    except (ValueError, OSError) as e:
        print(f"asyncllm serve: {e}", file=sys.stderr)
        return 2
    try:
        args = serve_engine_args(ns)
        _check_engine_args(args)
        if args.engine_process or ns.data_parallel_size > 1:
            # Commands go down and outputs come up through threads of this process; a busy
            # loop lets them run only at the switch interval (ops/bench/NOTES.md, "Serving,
            # third round": at 5 ms a wave of new requests reached the engine in pieces).
            sys.setswitchinterval(envs.switch_interval_ms() / 1e3)
        engine, engine_states = _serve_engine(args, ns)
    except ValueError as e:
        sock.close()
        print(f"asyncllm serve: {e}", file=sys.stderr)
        return 2
    if not settings.api_keys:
        logger.warning(
            "no API key configured (--api-key or ASYNCLLM_API_KEYS): anyone who can reach "
            "%s:%s can use this server",
            settings.host,
            settings.port,
        )
    app = build_app(engine, settings, engine_states=engine_states)
    server = GatewayServer(uvicorn_config(app, settings, log_level=ns.log_level), app.state.drain)
    # Ctrl-C / SIGTERM: open streams end with a shutting_down error, sockets close (1001), the
    # lifespan shuts the engine down; uvicorn then raises the signal again for the default
    # behaviour: that is not an error here.
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0 if server.started else 1


def _serve_engine(args: EngineArgs, ns: argparse.Namespace) -> tuple[Any, Any]:
    """(the EngineClient to serve, its per-engine states for metrics or None): one engine, or
    with --data-parallel-size N a DataParallelEngine of N engine processes."""
    from asyncllm.engine.async_engine import AsyncLLMEngine

    n = ns.data_parallel_size
    if n < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {n}")
    if n == 1:
        return AsyncLLMEngine.from_engine_args(args), None
    if vars(ns).get("engine_engine_process") is False:
        raise ValueError(
            "--data-parallel-size runs every engine in its own process: drop --no-engine-process"
        )
    from asyncllm.engine.data_parallel import DataParallelEngine

    dp = DataParallelEngine.from_engine_args(args, n)
    return dp, dp.engine_states


def _listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (uvicorn listens on it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise OSError(
            f"cannot listen on {host}:{port}: {why} (choose another with --port)"
        ) from None
    return sock


def cmd_chat(ns: argparse.Namespace) -> int:
    from asyncllm.terminal_chat import run_chat

    try:
        args = engine_args_from(ns)
        _check_engine_args(args)
        run_chat(args, ns.max_tokens, ns.temperature, ns.system)
    except ValueError as e:
        print(f"asyncllm chat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0


def _check_engine_args(args: EngineArgs) -> None:
    """Fail fast, with the engine's own message (ValueError), on a model that cannot be found,
    --device cuda without CUDA or a --max-model-len over the model's."""
    from asyncllm.engine.engine_builder import check_engine_args

    check_engine_args(args)


def cmd_bench(ns: argparse.Namespace) -> int:
    return run_bench(list(ns.args))


def run_bench(argv: list[str]) -> int:
    from asyncllm.bench.__main__ import main as bench_main

    return int(bench_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmarks
        return run_bench(argv[1:])
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        return int(ns.func(ns) or 0)
    except ModuleNotFoundError as e:
        # a client-only install (asyncllm[client]) has no engine or gateway
        from asyncllm import missing_dependency_error

        err = missing_dependency_error("the asyncllm command", e)
        if err is e:
            raise
        print(f"asyncllm: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
