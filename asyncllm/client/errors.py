"""Errors the client raises. Every failure of a chat is one of these, never a silent gap.

    AsyncLLMClientError
    ├── ServerError(code, message)        an `error` frame or a refused handshake
    │   ├── AuthError                     code "unauthorized" (HTTP 401/403, close 4401)
    │   └── Overloaded(retry_after)       code "overloaded" (HTTP 429/503, close 1013)
    ├── StreamLost(text)                  the stream cannot be continued; `text` = what arrived
    ├── ConnectionFailed                  could not (re)connect within the retry budget
    └── ClientClosed                      the Client was closed while the stream was open

Errors raised by a stream carry `text`: the text delivered for it so far (choice 0).
"""

from __future__ import annotations

from asyncllm.protocol import OVERLOADED, UNAUTHORIZED


class AsyncLLMClientError(Exception):
    """Base class of the client's errors."""

    text: str = ""  # the text of the stream delivered before the failure (choice 0)


class ServerError(AsyncLLMClientError):
    """The server refused a request or a stream: an `error` frame with `code` and `message`."""

    def __init__(self, code: str, message: str, stream_id: str | int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.stream_id = stream_id


class AuthError(ServerError):
    """The API key was missing or wrong (or the origin refused). Retrying will not help."""

    def __init__(self, message: str, stream_id: str | int | None = None):
        super().__init__(UNAUTHORIZED, message, stream_id)


class Overloaded(ServerError):
    """The server is at a limit; `retry_after` (seconds) is its hint, when it gave one."""

    def __init__(
        self, message: str, retry_after: float | None = None, stream_id: str | int | None = None
    ):
        super().__init__(OVERLOADED, message, stream_id)
        self.retry_after = retry_after


class StreamLost(AsyncLLMClientError):
    """The stream cannot be continued (its session expired while disconnected, the server no
    longer has it, or a reconnect failed). `text` is everything delivered before the loss."""

    def __init__(self, message: str, text: str = "", stream_id: str | int | None = None):
        super().__init__(message)
        self.text = text
        self.stream_id = stream_id


class ConnectionFailed(AsyncLLMClientError):
    """No connection to the server could be made within the configured attempts."""


class ClientClosed(AsyncLLMClientError):
    """The Client was closed (or is not open) while a stream needed it."""


def error_from_frame(frame: dict) -> ServerError:
    """Map an `error` frame to the matching exception."""
    code = str(frame.get("code"))
    message = str(frame.get("message"))
    sid = frame.get("id")
    if code == UNAUTHORIZED:
        return AuthError(message, sid)
    if code == OVERLOADED:
        ra = frame.get("retry_after")
        return Overloaded(message, float(ra) if isinstance(ra, (int, float)) else None, sid)
    return ServerError(code, message, sid)
