"""WebSocket protocol v1 (`/v1/ws`), shared by the gateway and the client. No torch here.

Frames are JSON text, one object each, with a `type`. The names and fields are public: browser
pages and bots are written against them (docs/PROTOCOL.md).
"""

from __future__ import annotations

from typing import Any

import orjson

PROTOCOL_VERSION = 1
WS_PATH = "/v1/ws"

# client -> server
CHAT = "chat"
COMPLETE = "complete"
CANCEL = "cancel"
RESUME = "resume"
# server -> client
SESSION = "session"
DELTA = "delta"
DONE = "done"
ERROR = "error"

# error codes
INVALID_REQUEST = "invalid_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
OVERLOADED = "overloaded"
INTERNAL = "internal"
ERROR_CODES = (INVALID_REQUEST, UNAUTHORIZED, NOT_FOUND, TOO_LARGE, OVERLOADED, INTERNAL)

# finish reasons on `done`
FINISH_REASONS = ("stop", "length", "cancelled", "error")


def encode(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def decode(data: str | bytes) -> Any:
    return orjson.loads(data)
