"""The serving gateway: WebSocket protocol v1 with sessions and resume, OpenAI-compatible HTTP,
auth, limits and metrics, built as one Starlette app around an AsyncLLMEngine."""

from asyncllm.gateway.app import build_app, uvicorn_config
from asyncllm.gateway.settings import GatewaySettings
from asyncllm.gateway.shutdown import GatewayServer

__all__ = ["build_app", "uvicorn_config", "GatewaySettings", "GatewayServer"]
