"""GatewaySettings: everything the gateway takes besides the engine. Bad values raise ValueError."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from asyncllm import envs
from asyncllm.gateway.auth import LOOPBACK_HOSTS, is_loopback


def _default_ui_file() -> str | None:
    """The chat page, shipped in the package (asyncllm/gateway/static, with its vendored JS)."""
    p = Path(__file__).resolve().parent / "static" / "chat.html"
    return str(p) if p.is_file() else None


def api_keys_from_env() -> tuple[str, ...]:
    return envs.api_keys()


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no auth (serve warns)
    # Browsers' Origin header. Same-origin requests and requests without an Origin (non-browser
    # clients) are always allowed; "*" allows every origin.
    allowed_origins: tuple[str, ...] = ()
    # Host header names served (exact, ".domain" for it and its subdomains, "*" = any). None:
    # the loopback names when bound to a loopback address (DNS rebinding), any name otherwise.
    allowed_hosts: tuple[str, ...] | None = None
    resume_ttl: float = 30.0  # seconds a dropped socket's streams wait for a resume
    max_frame_bytes: int = 1 << 20  # one WebSocket frame / one HTTP body
    max_streams_per_connection: int = 64  # unfinished streams of one session
    max_connections: int = 1024  # open WebSockets
    # TCP level (asyncllm.gateway.transport): a request's line and headers must arrive within
    # header_timeout seconds of connecting (or of the previous response), the whole request
    # within body_timeout; idle keep-alive connections close after keep_alive_timeout.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_tcp_connections: int | None = None  # None: below the open-file limit (transport.py)
    # Per client: TCP connections from one IP, WebSockets per API key; unfinished requests
    # (streams and HTTP) per IP and per API key. Behind a proxy the IP is the proxy's.
    max_connections_per_client: int = 512
    max_streams_per_client: int = 512
    max_prompt_tokens: int | None = None  # None: the model's max_model_len - 1
    max_queue: int = 1024  # requests admitted but not yet given a first token
    replay_buffer_bytes: int = 4 << 20  # per stream: frames kept for a resume
    finished_streams_kept: int = 256  # per session: finished streams still resumable
    retry_after: int = 1  # seconds, on 429/503
    shutdown_timeout: float = 10.0  # seconds to end open streams and close sockets at shutdown
    ws_ping_interval: float | None = 20.0  # protocol-level ping from the server
    ws_ping_timeout: float | None = 20.0
    ui: bool = True  # serve the chat page at / when the file exists
    metrics_public: bool = False  # /metrics without an API key (for a Prometheus scraper)
    ui_file: str | None = field(default_factory=_default_ui_file)
    manage_engine: bool = True  # the app's lifespan starts and shuts down the engine
    # gc.freeze() once the engine has started: for a process the server owns (asyncllm serve),
    # whose start-up heap lives to the end; full collections then skip it instead of stalling
    # the loop. Off for apps embedding the gateway: it would also pin their cyclic garbage.
    freeze_gc: bool = False
    served_model_name: str | None = None  # None: the engine's model_config.served_model_name
    # tool_choice "auto": how the model writes calls (asyncllm.tools); None: chosen per model
    tool_call_parser: str | None = None
    # max_tokens of a request that names none; None: the model's generation_config.max_new_tokens
    # when it sets one, else up to max_model_len (chat) / 16 (completions, as OpenAI)
    max_tokens_default: int | None = None

    def __post_init__(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.allowed_origins)
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts)
            if any(not h or "/" in h for h in self.allowed_hosts):
                raise ValueError(f"allowed_hosts must be host names, got {self.allowed_hosts}")
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api keys must be non-empty strings")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.resume_ttl >= 0:
            raise ValueError(f"resume_ttl must be >= 0 seconds, got {self.resume_ttl}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.body_timeout < self.header_timeout:
            raise ValueError("body_timeout must be >= header_timeout (it includes the headers)")
        if self.max_tcp_connections is not None and self.max_tcp_connections < 1:
            raise ValueError(f"max_tcp_connections must be >= 1, got {self.max_tcp_connections}")
        for name in (
            "max_connections_per_client",
            "max_streams_per_client",
            "max_frame_bytes",
            "max_streams_per_connection",
            "max_connections",
            "max_queue",
            "replay_buffer_bytes",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.finished_streams_kept < 0:
            raise ValueError(
                f"finished_streams_kept must be >= 0, got {self.finished_streams_kept}"
            )
        if self.tool_call_parser is not None:
            from asyncllm.tools import TOOL_CALL_PARSERS

            if self.tool_call_parser not in TOOL_CALL_PARSERS:
                raise ValueError(
                    f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, "
                    f"got {self.tool_call_parser!r}"
                )
        if self.max_tokens_default is not None and (
            not isinstance(self.max_tokens_default, int) or self.max_tokens_default < 1
        ):
            raise ValueError(f"max_tokens_default must be >= 1, got {self.max_tokens_default!r}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {self.retry_after}")

    @property
    def served_hosts(self) -> tuple[str, ...]:
        """The Host allow-list in force (see allowed_hosts)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        return LOOPBACK_HOSTS if is_loopback(self.host) else ("*",)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
