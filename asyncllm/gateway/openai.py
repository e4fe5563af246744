"""OpenAI-compatible HTTP: what the official `openai` Python client speaks.

POST /v1/chat/completions and /v1/completions (streaming as SSE ending in `data: [DONE]`, or one
JSON body), GET /v1/models. Errors use OpenAI's body: {"error": {"message", "type", "code"}}.
Every check (model, size, queue, engine alive) runs before a stream starts, so refusals are
HTTP statuses; a client that disconnects aborts its request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from asyncllm.gateway.auth import client_identity
from asyncllm.gateway.engine_io import EngineIO, Piece
from asyncllm.gateway.limits import GatewayError
from asyncllm.protocol import (
    INVALID_REQUEST,
    TOO_LARGE,
    GenParams,
    ProtocolError,
    parse_messages,
    parse_params,
    parse_prompt,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# Accepted and ignored: they change nothing about what is generated.
_IGNORED = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "user", "store", "metadata"}
    | {"service_tier", "parallel_tool_calls", "max_completion_tokens", "echo", "best_of"}
    | {"suffix", "logit_bias", "response_format", "tools", "tool_choice", "functions"}
    | {"function_call", "modalities", "prediction", "audio", "reasoning_effort"}
)


def error_response(e: ProtocolError) -> Response:
    status = getattr(e, "status", None) or 400
    body = {
        "error": {
            "message": e.message,
            "type": _ERROR_TYPES.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            ),
            "param": None,
            "code": e.code,
        }
    }
    headers = {}
    retry = getattr(e, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


def _check_content_type(request: Request) -> None:
    """JSON bodies only. A browser sends text/plain, form or multipart bodies cross-origin without
    a CORS preflight, so parsing those as JSON would let any page post requests here."""
    ctype = request.headers.get("content-type")
    if ctype is None:  # curl --data-binary without -H and similar tools: nothing to confuse
        return
    mime = ctype.partition(";")[0].strip().lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise GatewayError(
            INVALID_REQUEST,
            f"Content-Type must be application/json, got {ctype[:80]!r}",
            status=415,
        )


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, refusing anything over max_bytes without reading it all."""
    _check_content_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise GatewayError(TOO_LARGE, f"body is {length} bytes; the limit is {max_bytes}")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise GatewayError(TOO_LARGE, f"body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        obj = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as e:
        raise GatewayError(INVALID_REQUEST, f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise GatewayError(INVALID_REQUEST, "body must be a JSON object")
    return obj


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in ("tools", "functions"):
        if body.get(name):
            raise GatewayError(INVALID_REQUEST, f"{name} are not supported by this server")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise GatewayError(INVALID_REQUEST, "only response_format {'type': 'text'} is supported")
    if body.get("logit_bias"):
        raise GatewayError(INVALID_REQUEST, "logit_bias is not supported over HTTP")
    if body.get("echo") or (body.get("best_of") not in (None, 1)) or body.get("suffix"):
        raise GatewayError(INVALID_REQUEST, "echo, best_of and suffix are not supported")


def _params(body: dict[str, Any], chat: bool) -> GenParams:
    p = dict(body)
    if p.get("max_completion_tokens") is not None and p.get("max_tokens") is None:
        p["max_tokens"] = p["max_completion_tokens"]
    if not chat:
        # The legacy API's logprobs is the number of top tokens.
        lp = p.pop("logprobs", None)
        if lp is not None:
            if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
                raise GatewayError(INVALID_REQUEST, "logprobs must be an integer in [0, 5]")
            p["logprobs"], p["top_logprobs"] = True, lp
    gp = parse_params(p, ignore=_IGNORED)
    return gp


def _stream_flag(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise GatewayError(INVALID_REQUEST, "stream must be true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise GatewayError(INVALID_REQUEST, "stream_options must be an object")
    return stream, bool(opts.get("include_usage"))


def _chat_logprobs(lps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def one(d: dict[str, Any]) -> dict[str, Any]:
        tok = d.get("token") or ""
        return {"token": tok, "logprob": d.get("logprob"), "bytes": list(tok.encode())}

    return [{**one(d), "top_logprobs": [one(t) for t in d["top_logprobs"]]} for d in lps]


class _Completion:
    """Accumulates the pieces of one request for a non-streaming answer."""

    def __init__(self, n: int):
        self.text = [[] for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.tokens = 0

    def add(self, pieces: list[Piece]) -> None:
        for p in pieces:
            self.text[p.index].append(p.text)
            if p.logprobs:
                self.logprobs[p.index].extend(p.logprobs)
            if p.finish_reason:
                self.finish[p.index] = p.finish_reason
            self.tokens += len(p.token_ids)


def _legacy_logprobs(lps: list[dict[str, Any]], offset0: int = 0) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = offset0
    for d in lps:
        tok = d.get("token") or ""
        tokens.append(tok)
        token_lps.append(d.get("logprob"))
        tops.append({t["token"] or "": t["logprob"] for t in d["top_logprobs"]})
        offsets.append(off)
        off += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


class OpenAIRoutes:
    def __init__(self, io: EngineIO):
        self.io = io

    async def models(self, request: Request) -> Response:
        io = self.io
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": io.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "asyncllm",
                        "max_model_len": io.max_model_len,
                    }
                ],
            }
        )

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Response:
        io = self.io
        body = await read_json(request, io.settings.max_frame_bytes)
        io.check_model(body.get("model") if isinstance(body.get("model"), str) else None)
        if body.get("model") is not None and not isinstance(body.get("model"), str):
            raise GatewayError(INVALID_REQUEST, "model must be a string")
        _refuse_unsupported(body)
        stream, include_usage = _stream_flag(body)
        gp = _params(body, chat)
        if chat:
            if "messages" not in body:
                raise GatewayError(INVALID_REQUEST, "messages is required")
            messages, prompt = parse_messages(body["messages"]), None
        else:
            if "prompt" not in body:
                raise GatewayError(INVALID_REQUEST, "prompt is required")
            raw = body["prompt"]
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
                raw = raw[0]  # a batch of one
            elif isinstance(raw, list) and raw and isinstance(raw[0], (str, list)):
                raise GatewayError(INVALID_REQUEST, "send one prompt per request")
            messages, prompt = None, parse_prompt(raw)
        client = client_identity(request, io.settings.api_keys)
        io.admit(client=client)
        params = io.sampling_params(gp, default_max_tokens=None if chat else 16)
        ids = await io.encode(messages, prompt, None)
        io.admit(client=client)
        rid = io.new_request_id("chatcmpl" if chat else "cmpl")
        api = "chat" if chat else "completions"
        gen = io.generate(ids, params, gp.priority, api, rid, client=client)
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": io.model_name,
        }
        if stream:
            body_iter = self._sse(gen, meta, chat, gp.n, len(ids), include_usage)
            return StreamingResponse(
                body_iter,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._collect(request, gen, gp.n)
        if result is None:  # the client went away; the request was aborted
            return Response(status_code=499)
        return json_response(self._full_body(result, meta, chat, len(ids)))

    async def _collect(self, request: Request, gen: Any, n: int) -> _Completion | None:
        comp = _Completion(n)
        done = False
        failure: ProtocolError | None = None
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    msg = await request.receive()
                    if msg["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                async with aclosing(gen):
                    async for pieces in gen:
                        comp.add(pieces)
                done = True
            except ProtocolError as e:
                # Raised out of the task group it would come wrapped in an ExceptionGroup, which
                # no handler maps to a status: the client got a plain-text 500 (and retried it).
                failure = e
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return comp if done else None

    def _full_body(
        self, c: _Completion, meta: dict[str, Any], chat: bool, prompt_tokens: int
    ) -> dict[str, Any]:
        choices = []
        for i, parts in enumerate(c.text):
            text = "".join(parts)
            lps = c.logprobs[i]
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": {"content": _chat_logprobs(lps)} if lps else None,
                        "finish_reason": c.finish[i] or "stop",
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": _legacy_logprobs(lps) if lps else None,
                        "finish_reason": c.finish[i] or "stop",
                    }
                )
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": c.tokens,
                "total_tokens": prompt_tokens + c.tokens,
            },
        }

    async def _sse(
        self,
        gen: Any,
        meta: dict[str, Any],
        chat: bool,
        n: int,
        prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_null = {"usage": None} if include_usage else {}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return (
                b"data: "
                + orjson.dumps({**meta, "object": obj, "choices": choices, **extra})
                + b"\n\n"
            )

        tokens = 0
        offsets = [0] * n
        if chat:  # the role comes first, once per choice
            yield event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ],
                **usage_null,
            )
        try:
            async with aclosing(gen):
                async for pieces in gen:
                    choices = []
                    for p in pieces:
                        tokens += len(p.token_ids)
                        if not (p.text or p.finish_reason or p.logprobs):
                            continue
                        if chat:
                            choices.append(
                                {
                                    "index": p.index,
                                    "delta": {"content": p.text} if p.text else {},
                                    "logprobs": {"content": _chat_logprobs(p.logprobs)}
                                    if p.logprobs
                                    else None,
                                    "finish_reason": p.finish_reason,
                                }
                            )
                        else:
                            choices.append(
                                {
                                    "index": p.index,
                                    "text": p.text,
                                    "logprobs": _legacy_logprobs(p.logprobs, offsets[p.index])
                                    if p.logprobs
                                    else None,
                                    "finish_reason": p.finish_reason,
                                }
                            )
                            offsets[p.index] += len(p.text)
                    if choices:
                        yield event(choices, **usage_null)
        except ProtocolError as e:
            # Headers are gone already: the error travels as an event, as OpenAI's API does.
            err = {"error": {"message": e.message, "type": "server_error", "code": e.code}}
            yield b"data: " + orjson.dumps(err) + b"\n\n"
        if include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            }
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"
