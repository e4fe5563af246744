"""asyncllm.client: a WebSocket client for the asyncllm gateway (protocol v1).

Needs only `asyncllm[client]` (websockets, orjson, tenacity, anyio); importing it never imports
torch or the engine.

    from asyncllm.client import Client
    async with Client("ws://127.0.0.1:8000/v1/ws", api_key="KEY") as client:
        async for delta in client.chat([{"role": "user", "content": "Hi"}], max_tokens=64):
            print(delta.text, end="")
"""

from asyncllm.client.client import Client
from asyncllm.client.errors import (
    AsyncLLMClientError,
    AuthError,
    ClientClosed,
    ConnectionFailed,
    Overloaded,
    ServerError,
    StreamLost,
)
from asyncllm.client.stream import ChatStream, Delta, Usage
from asyncllm.client.sync import SyncClient, SyncStream

__all__ = [
    "Client",
    "ChatStream",
    "Delta",
    "Usage",
    "SyncClient",
    "SyncStream",
    "AsyncLLMClientError",
    "AuthError",
    "ClientClosed",
    "ConnectionFailed",
    "Overloaded",
    "ServerError",
    "StreamLost",
]
