"""build_app(engine, settings) -> Starlette: the gateway's routes, guards and lifespan.

The lifespan starts the engine (when the app manages it), runs the app's task group (WebSocket
streams live there, so they outlive their socket) and the session reaper, and on the way out
cancels every stream and shuts the engine down.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from asyncllm.engine.engine_client import EngineClient
from asyncllm.gateway.auth import authorized, browser_refusal
from asyncllm.gateway.engine_io import EngineIO
from asyncllm.gateway.limits import GatewayError, as_gateway_error
from asyncllm.gateway.metrics import Metrics
from asyncllm.gateway.openai import ClientGone, OpenAIRoutes, error_response, json_response
from asyncllm.gateway.sessions import SessionManager
from asyncllm.gateway.settings import GatewaySettings
from asyncllm.gateway.shutdown import make_drain
from asyncllm.gateway.transport import (
    ConnectionLimits,
    default_max_tcp_connections,
    install_log_redaction,
    protocol_class,
)
from asyncllm.gateway.utility_routes import UtilityRoutes
from asyncllm.gateway.ws import WebSocketGateway
from asyncllm.profiling import ThreadProfile
from asyncllm.protocol import (
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    UNAUTHORIZED,
    WS_PATH,
    ProtocolError,
)

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(settings: GatewaySettings, metrics: Metrics, handler: Handler) -> Handler:
    """Origin and API key checks, then the handler; protocol errors become OpenAI error bodies."""

    def fail(e: GatewayError) -> Response:
        metrics.errors.labels("http", e.code).inc()
        return error_response(e)

    async def endpoint(request: Request) -> Response:
        try:
            refusal = browser_refusal(request, settings.allowed_origins, settings.served_hosts)
            if refusal is not None:
                return fail(GatewayError(UNAUTHORIZED, refusal, status=403))
            if not authorized(request, settings.api_keys):
                return fail(
                    GatewayError(UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer)")
                )
            return await handler(request)
        except ClientGone:
            return Response(status_code=499)  # nobody is listening: no body, no traceback
        except Exception as e:
            err = _as_protocol_error(e)
            if err is None:
                logger.exception("%s %s failed", request.method, request.url.path)
                err = GatewayError(INTERNAL, f"internal error: {type(e).__name__}")
            return fail(as_gateway_error(err))

    return endpoint


def _as_protocol_error(e: BaseException) -> ProtocolError | None:
    """`e` itself, or the one protocol error inside (nested) exception groups: a task group
    wraps what its body raises, and the wrapper must still answer with the error's status."""
    inner = getattr(e, "exceptions", None)  # BaseExceptionGroup (a builtin from Python 3.11)
    while isinstance(inner, tuple) and len(inner) == 1:
        e = inner[0]
        inner = getattr(e, "exceptions", None)
    return e if isinstance(e, ProtocolError) else None


def build_app(
    engine: EngineClient,
    settings: GatewaySettings | None = None,
    engine_states: Callable[[], Sequence[Any]] | None = None,
) -> Starlette:
    """`engine_states`: for a data-parallel group (DataParallelEngine.engine_states), the
    per-engine metrics."""
    settings = settings or GatewaySettings()
    metrics = Metrics(stats=engine.stats, engine_states=engine_states)
    io = EngineIO(engine, settings, metrics)
    manager = SessionManager(settings.resume_ttl, settings.finished_streams_kept)
    wsg = WebSocketGateway(io, manager)
    oa = OpenAIRoutes(io)
    ut = UtilityRoutes(io)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Only with ASYNCLLM_PROFILE_DIR; started first so that on Python 3.12+, where one
        # profiler sees every thread, it is the one that holds the server's whole profile.
        prof = ThreadProfile("server-loop")
        prof.start()
        try:
            if settings.manage_engine:
                await engine.start()  # loads the model (off the event loop) before serving
        except BaseException:
            prof.stop()
            raise
        if settings.freeze_gc:
            gc.collect()
            gc.freeze()
        io.bind()
        logger.info("serving %s (max_model_len %d)", io.model_name, io.max_model_len)
        try:
            async with anyio.create_task_group() as tg:
                wsg.task_group = tg
                tg.start_soon(_reap, manager, settings.resume_ttl)
                yield
                manager.close_all()
                tg.cancel_scope.cancel()
        finally:
            prof.stop()
            wsg.task_group = None
            if settings.freeze_gc:
                # Give the frozen start-up heap back to the collector: objects frozen in cycles
                # are never freed at exit otherwise, and extensions notice (triton's nanobind
                # module printed ~30 lines of "nanobind: leaked ..." at every exit).
                gc.unfreeze()
            if settings.manage_engine:
                await engine.shutdown()
                logger.info("engine shut down")

    async def health(request: Request) -> Response:
        if io.alive:
            return json_response({"status": "ok"})
        return json_response({"status": "dead"}, 503)

    async def metrics_route(request: Request) -> Response:
        metrics.sessions.set(len(manager.sessions))
        return Response(metrics.render(io.alive), media_type=metrics.content_type)

    async def index(request: Request) -> Response:
        f = settings.ui_file
        if settings.ui and f and Path(f).is_file():
            return FileResponse(f, media_type="text/html")
        raise GatewayError(NOT_FOUND, "no chat page here (started with --no-ui, or not installed)")

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route(
            "/metrics",
            # --metrics-public: a scraper without the key (it sees counts, no prompts or keys)
            metrics_route
            if settings.metrics_public
            else _guarded(settings, metrics, metrics_route),
            methods=["GET"],
        ),
        Route("/v1/models", _guarded(settings, metrics, oa.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _guarded(settings, metrics, ut.model), methods=["GET"]),
        Route("/version", _guarded(settings, metrics, ut.version), methods=["GET"]),
        Route("/tokenize", _guarded(settings, metrics, ut.tokenize), methods=["POST"]),
        Route("/detokenize", _guarded(settings, metrics, ut.detokenize), methods=["POST"]),
        Route(
            "/v1/chat/completions",
            _guarded(settings, metrics, oa.chat_completions),
            methods=["POST"],
        ),
        Route("/v1/completions", _guarded(settings, metrics, oa.completions), methods=["POST"]),
        WebSocketRoute(WS_PATH, wsg.endpoint),
        # The chat page holds no data and no key (it asks for one and sends it as ?api_key=
        # on the socket), so it is served without auth, like /health.
        Route("/", _unguarded_errors(index), methods=["GET"]),
    ]
    vendor = Path(settings.ui_file).parent / "vendor" if settings.ui_file else None
    if settings.ui and vendor is not None and vendor.is_dir():
        # the page's JavaScript (Markdown, sanitizer, highlighting), shipped with it: no CDN
        routes.append(Mount("/vendor", StaticFiles(directory=vendor), name="vendor"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        e = GatewayError(code, str(exc.detail), status=exc.status_code)
        return error_response(e)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Anything no route caught: still OpenAI's JSON shape (Starlette logs the traceback).
        return error_response(GatewayError(INTERNAL, f"internal error: {type(exc).__name__}"))

    middleware = []
    if settings.allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
            )
        )
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.io = io
    app.state.sessions = manager
    app.state.metrics = metrics
    app.state.drain = make_drain(io, manager)  # GatewayServer runs it on Ctrl-C / SIGTERM
    return app


def _unguarded_errors(handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as e:
            return error_response(e)

    return endpoint


async def _reap(manager: SessionManager, ttl: float) -> None:
    interval = min(1.0, max(0.05, ttl / 4))
    while True:
        await anyio.sleep(interval)
        try:
            manager.reap()
        except Exception:  # the reaper must not die and leave streams running forever
            logger.exception("session reaper failed")


def uvicorn_config(app: Starlette, settings: GatewaySettings, **kw: Any) -> Any:
    """The uvicorn Config `asyncllm serve` (and the tests) run the app with."""
    import uvicorn

    # Frames over max_frame_bytes get a too_large error frame; uvicorn itself closes the socket
    # (1009) only for frames far beyond it, which the gateway could not even parse cheaply.
    ws_max = max(settings.max_frame_bytes * 4, 1 << 16)
    kw.setdefault("log_level", "info")
    # At shutdown (GatewayServer), open streams are ended and sockets closed within this.
    kw.setdefault("timeout_graceful_shutdown", settings.shutdown_timeout)
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_tcp_connections or default_max_tcp_connections(),
        max_per_ip=settings.max_connections_per_client,
        retry_after=settings.retry_after,
    )
    kw.setdefault("http", protocol_class(limits))
    kw.setdefault("timeout_keep_alive", settings.keep_alive_timeout)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=ws_max,
        # Frames are small JSON objects sent per token: compressing each costs the event loop
        # (and so the engine thread, which shares the GIL with it) more than it saves.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        lifespan="on",
        **kw,
    )
    install_log_redaction()  # after Config: it configures uvicorn's loggers
    return config
