"""Checked by mypy in tests/test_engine_client.py (not collected by pytest): the gateway's stub
engine and AsyncLLMEngine both satisfy EngineClient, and build_app takes them as such."""

from __future__ import annotations

from asyncllm.config import EngineArgs
from asyncllm.engine.async_engine import AsyncLLMEngine
from asyncllm.engine.engine_client import EngineClient
from asyncllm.gateway import build_app
from tests.gateway_helpers import FakeEngine

fake: EngineClient = FakeEngine()
real: EngineClient = AsyncLLMEngine.from_engine_args(EngineArgs())
build_app(fake)
build_app(real)
