"""`asyncllm serve | chat | bench`.

serve: the gateway (WebSocket /v1/ws, OpenAI HTTP, /metrics, /health, the chat page at /) on
uvicorn; the engine loads in the app's lifespan and shuts down with it (Ctrl-C is clean).
chat: an interactive terminal chat on the engine, no server.
bench: forwarded to the benchmark suite (ops/bench) when it is importable.
Every EngineArgs field is a flag of serve and chat (generated from the dataclass).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from asyncllm.config import EngineArgs

logger = logging.getLogger("asyncllm")

# `asyncllm bench ARGS...` calls the first of these that imports, as main(argv) -> int.
BENCH_ENTRY_POINTS = ("asyncllm.bench:main", "ops.bench.__main__:main")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of an EngineArgs field; annotations are strings (PEP 563)."""
    ann = str(f.type).replace(" ", "")
    optional = "None" in ann.split("|")
    base = next(t for t in ann.split("|") if t != "None")
    return {"str": str, "int": int, "float": float, "bool": bool}[base], optional


def add_engine_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("model",)) -> None:
    """One flag per EngineArgs field; flags not given keep EngineArgs' own defaults."""
    group = parser.add_argument_group("engine (EngineArgs)")
    defaults = EngineArgs()
    for f in dataclasses.fields(EngineArgs):
        if f.name in skip or f.name.startswith("_"):
            continue
        typ, optional = _field_type(f)
        default = getattr(defaults, f.name)
        help_ = f"default: {default!r}"
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

    s = sub.add_parser("serve", help="run the gateway (WebSocket + OpenAI HTTP)")
    s.add_argument("model", nargs="?", default=None, help="HF dir, hub id, .gguf (default model)")
    s.add_argument("--host", default=gs.host)
    s.add_argument("--port", type=int, default=gs.port)
    s.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; also ASYNCLLM_API_KEYS=k1,k2). None: no auth",
    )
    s.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        help="browser origin allowed besides the server's own (repeatable; * = any)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        help="Host header name served (repeatable; .example.com = domain and subdomains; * = any)."
        " Default: the loopback names when bound to loopback (DNS rebinding), any name otherwise",
    )
    s.add_argument("--resume-ttl", type=float, default=gs.resume_ttl, help="seconds")
    s.add_argument("--max-frame-bytes", type=int, default=gs.max_frame_bytes)
    s.add_argument("--max-streams-per-connection", type=int, default=gs.max_streams_per_connection)
    s.add_argument("--max-connections", type=int, default=gs.max_connections)
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="default: max_model_len-1")
    s.add_argument("--max-queue", type=int, default=gs.max_queue)
    s.add_argument("--replay-buffer-bytes", type=int, default=gs.replay_buffer_bytes)
    s.add_argument("--finished-streams-kept", type=int, default=gs.finished_streams_kept)
    s.add_argument("--retry-after", type=int, default=gs.retry_after, help="seconds, on 429/503")
    s.add_argument("--ws-ping-interval", type=float, default=gs.ws_ping_interval)
    s.add_argument("--ws-ping-timeout", type=float, default=gs.ws_ping_timeout)
    s.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    s.add_argument("--ui-file", default=None, help="the chat page to serve at /")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="interactive terminal chat on the engine")
    c.add_argument("model", nargs="?", default=None)
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser(
        "bench", help="benchmarks (ops/bench); arguments are passed on", add_help=False
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
        ws_ping_interval=ns.ws_ping_interval,
        ws_ping_timeout=ns.ws_ping_timeout,
        ui=not ns.no_ui,
        freeze_gc=True,  # `asyncllm serve` owns its process
        **kw,
    )


def cmd_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from asyncllm.engine.async_engine import AsyncLLMEngine
    from asyncllm.gateway import build_app, uvicorn_config

    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = settings_from(ns)
        args = serve_engine_args(ns)
        _check_model(args)
        engine = AsyncLLMEngine.from_engine_args(args)
    except ValueError as e:
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
    server = uvicorn.Server(uvicorn_config(app, settings, log_level=ns.log_level))
    # uvicorn turns Ctrl-C / SIGTERM into a graceful exit (the lifespan shuts the engine down),
    # then raises the signal again for the default behaviour: that is not an error here.
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1


def cmd_chat(ns: argparse.Namespace) -> int:
    import anyio

    try:
        args = engine_args_from(ns)
        _check_model(args)
        anyio.run(_chat, args, ns)
    except ValueError as e:
        print(f"asyncllm chat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0


def _check_model(args: EngineArgs) -> None:
    """Fail fast, with the loader's own message, on a model that cannot be found."""
    from asyncllm.engine.loader import resolve_model

    resolve_model(args.model, args.revision)


async def _chat(args: EngineArgs, ns: argparse.Namespace) -> None:
    import anyio

    from asyncllm.engine.async_engine import AsyncLLMEngine
    from asyncllm.sampling_params import RequestOutputKind, SamplingParams

    system = [{"role": "system", "content": ns.system}] if ns.system else []
    history: list[dict[str, str]] = []
    print("loading the model...", file=sys.stderr)
    async with AsyncLLMEngine.from_engine_args(args) as engine:
        print("type a message; /reset clears the chat, /exit (or Ctrl-D) quits", file=sys.stderr)
        while True:
            try:
                line = await anyio.to_thread.run_sync(input, "> ")
            except EOFError:
                print()
                return
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                history.clear()
                continue
            history.append({"role": "user", "content": line})
            params = SamplingParams(
                max_tokens=ns.max_tokens,
                temperature=ns.temperature,
                output_kind=RequestOutputKind.DELTA,
            )
            reply = []
            try:
                async for out in engine.chat(system + history, params):
                    for c in out.outputs:
                        reply.append(c.text)
                        print(c.text, end="", flush=True)
            except ValueError as e:  # e.g. the conversation outgrew the model
                print(f"\n[error: {e}]", file=sys.stderr)
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(ns: argparse.Namespace) -> int:
    return run_bench(list(ns.args))


def _source_checkout() -> str | None:
    """The repository root when asyncllm runs from a source checkout (e.g. `pip install -e .`).

    The `asyncllm` console script's sys.path holds its bin/ directory, not the working
    directory, and an editable install maps only the `asyncllm` package: `ops.bench` beside it
    is not importable until its root is on sys.path.
    """
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return str(root) if (root / "ops" / "bench" / "__main__.py").is_file() else None


def run_bench(argv: list[str]) -> int:
    root = _source_checkout()
    if root is not None and root not in sys.path:
        sys.path.append(root)
    for spec in BENCH_ENTRY_POINTS:
        mod_name, _, fn = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # not installed here; try the next
            raise
        return int(getattr(mod, fn)(argv) or 0)
    print(
        "asyncllm bench: the benchmark suite is not importable here "
        f"(tried {', '.join(BENCH_ENTRY_POINTS)}); run it from a source checkout",
        file=sys.stderr,
    )
    return 2


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
