"""WebSocket protocol v1 (`/v1/ws`), shared by the gateway and the client. No torch here.

Frames are JSON text, one object each, with a `type`. The names and fields are public: browser
pages and bots are written against them (docs/PROTOCOL.md is the user-facing write-up).

Client -> server frames are parsed with `parse_client_frame`, which either returns a typed frame
or raises `ProtocolError(code, message, id)`; it never raises anything else, whatever the input.
Server -> client frames are built with `session_frame`, `delta_frame`, `done_frame`,
`error_frame` and read back (by the client) with `parse_server_frame` / `parse_server_frames`.

A client that connects with `?batch=1` may get a `batch` frame, `{"type":"batch","frames":[...]}`:
the frames the server had ready at one moment, in order, in one WebSocket message. It is only
packaging (numbering, replay and resume see the frames inside one by one); it exists because a
message costs the server a syscall and the ASGI/WebSocket layers' per-message work, which at
hundreds of streams was most of the gateway's cost per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from asyncllm.sampling_params import PARAM_RANGES, check_param
from asyncllm.structured import (
    CONSTRAINT_FIELDS,
    ConstraintError,
    constraint_for,
    parse_constraint_fields,
)

PROTOCOL_VERSION = 1
WS_PATH = "/v1/ws"

# client -> server
CHAT = "chat"
COMPLETE = "complete"
CANCEL = "cancel"
RESUME = "resume"
CLIENT_TYPES = (CHAT, COMPLETE, CANCEL, RESUME)
# server -> client
SESSION = "session"
DELTA = "delta"
DONE = "done"
ERROR = "error"
SERVER_TYPES = (SESSION, DELTA, DONE, ERROR)
BATCH = "batch"  # only to a client that asked with ?batch=1
BATCH_QUERY = "batch"
MAX_BATCH_BYTES = 1 << 16  # a batch message holds frames up to this many bytes (or one bigger)
# A session key a client may propose on its first connection (so that a proxy hashing on the key
# sends the first connection where every reconnect will go; docs/PROTOCOL.md). The server's own
# keys are 22 such characters (128 random bits); a shorter proposal could be guessed.
SESSION_KEY_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")

# Secrets off the URL (URLs end up in access logs): a browser cannot set headers on a WebSocket,
# but it can offer subprotocols. It offers SUBPROTOCOL (which the server selects) and carries
# the API key as KEY_SUBPROTOCOL + base64url(key) and a session as SESSION_SUBPROTOCOL + key.
# Other clients send `Authorization: Bearer K` and the SESSION_HEADER.
SUBPROTOCOL = "asyncllm.v1"
KEY_SUBPROTOCOL = "asyncllm.key."
SESSION_SUBPROTOCOL = "asyncllm.session."
SESSION_HEADER = "x-asyncllm-session"

# error codes
INVALID_REQUEST = "invalid_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
OVERLOADED = "overloaded"
INTERNAL = "internal"
SHUTTING_DOWN = "shutting_down"  # the server is stopping: the stream ended early, retry elsewhere
ERROR_CODES = (
    INVALID_REQUEST,
    UNAUTHORIZED,
    NOT_FOUND,
    TOO_LARGE,
    OVERLOADED,
    INTERNAL,
    SHUTTING_DOWN,
)

# finish reasons on `done`
FINISH_REASONS = ("stop", "length", "cancelled", "error", "tool_calls")

# WebSocket close codes the server uses when it ends a socket itself (4000-4999 are free for
# applications; 1008/1013 are the standard "policy violation" / "try again later").
CLOSE_UNAUTHORIZED = 4401
CLOSE_SESSION_TAKEN = 4409  # another socket reconnected with this session
CLOSE_OVERLOADED = 1013
CLOSE_GOING_AWAY = 1001

MAX_ID_LENGTH = 256
MAX_MESSAGES = 1024  # per chat: each costs a template pass (30,000 empty ones stalled the loop)
# The roles chat templates know; any other string went into the prompt as a turn of its own.
ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: each token is matched against this much held text
MAX_N = 128

StreamId = str | int


class ProtocolError(ValueError):
    """A frame the server cannot act on. `id` is the stream it names, when that could be read."""

    def __init__(
        self, code: str, message: str, id: StreamId | None = None, *, type: str | None = None
    ):
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message
        self.id = id
        self.type = type  # the frame's type when it was readable (chat/complete/cancel/resume)

    def frame(self) -> dict[str, Any]:
        return error_frame(self.id, self.code, self.message)


# ---- generation parameters ----------------------------------------------------------------------


@dataclass
class GenParams:
    """The `params` object of chat/complete frames: OpenAI chat fields plus `priority`.

    None means "not given": the server's defaults apply. Types and ranges are checked here, by
    SamplingParams' own table (PARAM_RANGES); SamplingParams checks the rest on the server.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n: int = 1
    priority: int = 0
    # extensions (not OpenAI): also send the generated token ids on each delta; stop token ids
    return_token_ids: bool = False
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    # constraints (asyncllm.structured): checked plain values
    structured_outputs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    logit_bias: dict[int, float] | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `asyncllm.SamplingParams` (only the fields that were given)."""
        out: dict[str, Any] = {"n": self.n}
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "stop_token_ids",
            "min_tokens",
        ):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.logprobs or self.top_logprobs is not None:
            out["logprobs"] = self.top_logprobs or 0
        so = constraint_for(self.structured_outputs, self.tools, self.tool_choice)
        if so is not None:
            out["structured_outputs"] = so
        if self.logit_bias:
            out["logit_bias"] = dict(self.logit_bias)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Numeric params: each checked by SamplingParams' own table (PARAM_RANGES), under the
# SamplingParams field it maps onto, so both refuse the same values with the same message.
_NUMERIC_FIELDS = {
    # params name: SamplingParams field
    **{
        name: name
        for name in (
            "max_tokens", "top_k", "seed", "n", "min_tokens", "temperature", "top_p", "min_p",
            "presence_penalty", "frequency_penalty", "repetition_penalty",
        )
    },
    "top_logprobs": "logprobs",
}  # fmt: skip
MAX_TOP_LOGPROBS = 20
_BOOL_FIELDS = ("logprobs", "return_token_ids", "ignore_eos")
PARAM_FIELDS = frozenset(
    [*_NUMERIC_FIELDS, "priority", *_BOOL_FIELDS, "stop", "stop_token_ids", *CONSTRAINT_FIELDS]
)


def parse_params(
    obj: Any, id: StreamId | None = None, ignore: frozenset[str] = frozenset()
) -> GenParams:
    """Check a `params` object; unknown fields are an error (a typo must not pass silently),
    except those named in `ignore`. JSON null counts as "not given"."""
    if obj is None:
        return GenParams()
    if not isinstance(obj, dict):
        raise ProtocolError(INVALID_REQUEST, "params must be an object", id)
    unknown = sorted(k for k in obj if k not in PARAM_FIELDS and k not in ignore)
    if unknown:
        raise ProtocolError(
            INVALID_REQUEST,
            f"unknown params {unknown}; known: {sorted(PARAM_FIELDS)}",
            id,
        )
    kw: dict[str, Any] = {}
    for name, field_name in _NUMERIC_FIELDS.items():
        v = obj.get(name)
        if v is None:
            continue
        msg = check_param(field_name, v, label=name)
        if msg is not None:
            raise ProtocolError(INVALID_REQUEST, msg, id)
        kw[name] = v if PARAM_RANGES[field_name].integer else float(v)
    priority = obj.get("priority")
    if priority is not None:
        if not _is_int(priority):
            raise ProtocolError(INVALID_REQUEST, "params.priority must be an integer", id)
        kw["priority"] = priority
    # Server limits beyond the ranges: sizes, not validity.
    if kw.get("n", 1) > MAX_N:
        raise ProtocolError(TOO_LARGE, f"params.n must be <= {MAX_N}", id)
    if kw.get("top_logprobs", 0) > MAX_TOP_LOGPROBS:
        raise ProtocolError(
            INVALID_REQUEST, f"params.top_logprobs must be <= {MAX_TOP_LOGPROBS}", id
        )
    for name in _BOOL_FIELDS:
        v = obj.get(name)
        if v is None:
            continue
        if not isinstance(v, bool):
            raise ProtocolError(INVALID_REQUEST, f"params.{name} must be true or false", id)
        kw[name] = v
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or not all(isinstance(s, str) and s for s in stop)
            or len(stop) > MAX_STOP_STRINGS
        ):
            raise ProtocolError(
                INVALID_REQUEST,
                f"params.stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}",
                id,
            )
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ProtocolError(
                INVALID_REQUEST,
                f"params.stop strings must be at most {MAX_STOP_CHARS} characters",
                id,
            )
        kw["stop"] = stop
    sti = obj.get("stop_token_ids")
    if sti is not None:
        if not isinstance(sti, list) or not all(_is_int(t) and t >= 0 for t in sti):
            raise ProtocolError(
                INVALID_REQUEST, "params.stop_token_ids must be a list of token ids", id
            )
        kw["stop_token_ids"] = sti
    try:
        kw.update(parse_constraint_fields(obj))
    except ConstraintError as e:
        raise ProtocolError(INVALID_REQUEST, f"params: {e}", id) from None
    return GenParams(**kw)


# ---- client -> server frames ------------------------------------------------------------------


@dataclass
class ChatFrame:
    id: StreamId
    messages: list[dict[str, str]]
    params: GenParams = field(default_factory=GenParams)
    model: str | None = None
    type: str = CHAT


@dataclass
class CompleteFrame:
    id: StreamId
    prompt: str | list[int]
    params: GenParams = field(default_factory=GenParams)
    model: str | None = None
    type: str = COMPLETE


@dataclass
class CancelFrame:
    id: StreamId
    type: str = CANCEL


@dataclass
class ResumeFrame:
    id: StreamId
    after: int
    type: str = RESUME


ClientFrame = ChatFrame | CompleteFrame | CancelFrame | ResumeFrame


def valid_id(v: Any) -> bool:
    if isinstance(v, str):
        return 0 < len(v) <= MAX_ID_LENGTH
    return _is_int(v) and abs(v) < 2**53  # exact in JavaScript


def parse_messages(obj: Any, id: StreamId | None = None) -> list[dict[str, Any]]:
    """OpenAI chat messages: [{"role": str, "content": str | [{"type":"text","text":str}]}].
    Text parts are joined; other part types are refused. An assistant message may carry
    `tool_calls` (content null) and a `tool` message its `tool_call_id`; both are kept."""
    if not isinstance(obj, list) or not obj:
        raise ProtocolError(INVALID_REQUEST, "messages must be a non-empty list", id)
    if len(obj) > MAX_MESSAGES:
        raise ProtocolError(TOO_LARGE, f"at most {MAX_MESSAGES} messages per chat", id)
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, dict):
            raise ProtocolError(INVALID_REQUEST, f"messages[{i}] must be an object", id)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ProtocolError(
                INVALID_REQUEST, f"messages[{i}].role must be one of {', '.join(ROLES)}", id
            )
        if isinstance(content, list):
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text"):
                    raise ProtocolError(
                        INVALID_REQUEST, f"messages[{i}].content: only text parts are supported", id
                    )
                if not isinstance(p.get("text"), str):
                    raise ProtocolError(INVALID_REQUEST, f"messages[{i}] text must be a string", id)
                parts.append(p["text"])
            content = "".join(parts)
        calls = m.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise ProtocolError(INVALID_REQUEST, f"messages[{i}].content must be a string", id)
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls is not None:
            msg["tool_calls"] = _parse_tool_calls(calls, i, id)
        for key in ("tool_call_id", "name"):
            v = m.get(key)
            if v is not None:
                if not isinstance(v, str):
                    raise ProtocolError(
                        INVALID_REQUEST, f"messages[{i}].{key} must be a string", id
                    )
                msg[key] = v
        out.append(msg)
    return out


def _parse_tool_calls(calls: Any, i: int, id: StreamId | None) -> list[dict[str, Any]]:
    bad = ProtocolError(
        INVALID_REQUEST,
        f"messages[{i}].tool_calls must be a list of "
        "{'id', 'type': 'function', 'function': {'name', 'arguments'}}",
        id,
    )
    if not isinstance(calls, list):
        raise bad
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = orjson.dumps(args).decode()
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def parse_prompt(obj: Any, id: StreamId | None = None) -> str | list[int]:
    if isinstance(obj, str):
        if not obj:
            raise ProtocolError(INVALID_REQUEST, "prompt is empty", id)
        return obj
    if isinstance(obj, list) and obj and all(_is_int(t) and t >= 0 for t in obj):
        return obj
    raise ProtocolError(INVALID_REQUEST, "prompt must be a non-empty string or token id list", id)


def _frame_id(obj: dict[str, Any]) -> StreamId | None:
    v = obj.get("id")
    return v if valid_id(v) else None


def parse_client_frame(data: str | bytes, max_bytes: int | None = None) -> ClientFrame:
    """Parse and check one client frame. Raises only ProtocolError (never anything else)."""
    try:
        return _parse_client_frame(data, max_bytes)
    except ProtocolError:
        raise
    except Exception as e:  # a bug here must still be an error frame, not a dead socket
        raise ProtocolError(INVALID_REQUEST, f"malformed frame ({type(e).__name__})") from e


def _parse_client_frame(data: str | bytes, max_bytes: int | None) -> ClientFrame:
    if not isinstance(data, (str, bytes)):
        raise ProtocolError(INVALID_REQUEST, "frames must be JSON text")
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError(TOO_LARGE, f"frame is {size} bytes; the limit is {max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(INVALID_REQUEST, f"frame is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(INVALID_REQUEST, "a frame must be a JSON object")
    ftype = obj.get("type")
    fid = _frame_id(obj)
    try:
        return _parse_typed(obj, ftype, fid)
    except ProtocolError as e:
        if ftype in CLIENT_TYPES:
            e.type = ftype
        raise


def _parse_typed(obj: dict[str, Any], ftype: Any, fid: StreamId | None) -> ClientFrame:
    if ftype not in CLIENT_TYPES:
        raise ProtocolError(
            INVALID_REQUEST,
            f"unknown frame type {ftype!r}; expected one of {list(CLIENT_TYPES)}",
            fid,
        )
    if "id" not in obj:
        raise ProtocolError(INVALID_REQUEST, f"{ftype} frame needs an id")
    if fid is None:
        raise ProtocolError(
            INVALID_REQUEST,
            f"id must be a non-empty string (up to {MAX_ID_LENGTH} chars) or an integer",
        )
    allowed = {
        CHAT: {"type", "id", "messages", "params", "model"},
        COMPLETE: {"type", "id", "prompt", "params", "model"},
        CANCEL: {"type", "id"},
        RESUME: {"type", "id", "after"},
    }[ftype]
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        raise ProtocolError(INVALID_REQUEST, f"unknown fields in {ftype} frame: {unknown}", fid)
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(INVALID_REQUEST, "model must be a string", fid)
    if ftype == CHAT:
        if "messages" not in obj:
            raise ProtocolError(INVALID_REQUEST, "chat frame needs messages", fid)
        return ChatFrame(
            fid, parse_messages(obj["messages"], fid), parse_params(obj.get("params"), fid), model
        )
    if ftype == COMPLETE:
        if "prompt" not in obj:
            raise ProtocolError(INVALID_REQUEST, "complete frame needs a prompt", fid)
        params = parse_params(obj.get("params"), fid)
        if params.tools:
            raise ProtocolError(INVALID_REQUEST, "params.tools are for chat frames", fid)
        return CompleteFrame(fid, parse_prompt(obj["prompt"], fid), params, model)
    if ftype == CANCEL:
        return CancelFrame(fid)
    after = obj.get("after")
    if not _is_int(after) or after < 0:
        raise ProtocolError(INVALID_REQUEST, "resume frame needs after: an integer >= 0", fid)
    return ResumeFrame(fid, after)


# ---- server -> client frames ------------------------------------------------------------------


def session_frame(
    session: str, resume_ttl: float, batch: bool = False, resumed: bool | None = None
) -> dict[str, Any]:
    """`batch`: this socket may get batch frames (the client asked with ?batch=1). `resumed`:
    the session existed (its streams can be resumed); False for a new one, also when it has the
    key the client asked for (a proposal, or one that expired). The gateway always says."""
    f: dict[str, Any] = {"type": SESSION, "session": session, "resume_ttl": resume_ttl}
    if resumed is not None:
        f["resumed"] = resumed
    if batch:
        f["batch"] = True
    return f


def delta_frame(
    id: StreamId,
    seq: int,
    text: str,
    index: int = 0,
    token_ids: list[int] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    f: dict[str, Any] = {"type": DELTA, "id": id, "seq": seq, "text": text, "index": index}
    if token_ids is not None:
        f["token_ids"] = token_ids
    if logprobs is not None:
        f["logprobs"] = logprobs
    if tool_calls:
        # OpenAI's streamed shape: {"index", "id", "type", "function": {"name", "arguments"}}
        # first, then {"index", "function": {"arguments": piece}}; concatenate per index.
        f["tool_calls"] = tool_calls
    return f


def done_frame(
    id: StreamId,
    seq: int,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reasons: list[str] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    f: dict[str, Any] = {
        "type": DONE,
        "id": id,
        "seq": seq,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    if finish_reasons is not None:
        f["finish_reasons"] = finish_reasons
    if error is not None:
        f["error"] = error
    return f


def error_frame(id: StreamId | None, code: str, message: str) -> dict[str, Any]:
    return {"type": ERROR, "id": id, "code": code, "message": message}


_SERVER_FIELDS: dict[str, tuple[str, ...]] = {
    SESSION: ("session", "resume_ttl"),
    DELTA: ("id", "seq", "text", "index"),
    DONE: ("id", "seq", "finish_reason", "usage"),
    ERROR: ("id", "code", "message"),
}


def _check_server_frame(obj: Any, data: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("type") not in SERVER_TYPES:
        raise ValueError(f"not an asyncllm server frame: {str(data)[:200]!r}")
    t = obj["type"]
    missing = [k for k in _SERVER_FIELDS[t] if k not in obj]
    if missing:
        raise ValueError(f"{t} frame lacks {missing}")
    return obj


def _load(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"server frame is not JSON: {e}") from None


def parse_server_frame(data: str | bytes) -> dict[str, Any]:
    """For clients: decode one server frame (not a batch) and check the fields its type
    promises. Raises ValueError on anything else (a server bug or a non-asyncllm peer)."""
    return _check_server_frame(_load(data), data)


def parse_server_frames(data: str | bytes) -> list[dict[str, Any]]:
    """For clients: one WebSocket message -> its frames (a `batch` unwrapped, in order), each
    checked as by `parse_server_frame`."""
    obj = _load(data)
    if isinstance(obj, dict) and obj.get("type") == BATCH:
        frames = obj.get("frames")
        if not isinstance(frames, list):
            raise ValueError("batch frame lacks a frames list")
        return [_check_server_frame(f, f) for f in frames]
    return [_check_server_frame(obj, data)]


def batch_messages(frames: list[str], limit: int = MAX_BATCH_BYTES) -> list[str]:
    """Encoded frames -> as few messages as fit `limit` bytes each: a lone frame goes as it is,
    several go as one batch frame (joined, not re-encoded)."""
    out: list[str] = []
    group: list[str] = []
    size = 0
    for f in frames:
        if group and size + len(f) > limit:
            out.append(_batch(group))
            group, size = [], 0
        group.append(f)
        size += len(f) + 1
    if group:
        out.append(_batch(group))
    return out


def _batch(group: list[str]) -> str:
    if len(group) == 1:
        return group[0]
    return f'{{"type":"{BATCH}","frames":[' + ",".join(group) + "]}"


def encode(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def decode(data: str | bytes) -> Any:
    return orjson.loads(data)
