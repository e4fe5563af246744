"""Checked by mypy in tests/test_engine_client.py (not collected by pytest): the gateway's stub
engine, AsyncLLMEngine and DataParallelEngine satisfy EngineClient, and build_app takes them as
such (the group with its per-engine states)."""

from __future__ import annotations

from asyncllm.config import EngineArgs
from asyncllm.engine.async_engine import AsyncLLMEngine
from asyncllm.engine.data_parallel import DataParallelEngine
from asyncllm.engine.engine_client import EngineClient
from asyncllm.gateway import build_app
from tests.gateway_helpers import FakeEngine

fake: EngineClient = FakeEngine()
real: EngineClient = AsyncLLMEngine.from_engine_args(EngineArgs())
build_app(fake)
build_app(real)
group = DataParallelEngine([AsyncLLMEngine.from_engine_args(EngineArgs())])
dp: EngineClient = group
build_app(dp, engine_states=group.engine_states)
