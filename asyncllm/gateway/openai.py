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
from asyncllm.gateway.openai_choices import Shape, primed, tool_delta
from asyncllm.gateway.openai_prompts import (
    completion_prompts,
    echo_text,
    merge_pieces,
    with_suffix,
)
from asyncllm.protocol import (
    INVALID_REQUEST,
    TOO_LARGE,
    GenParams,
    ProtocolError,
    parse_messages,
    parse_params,
)
from asyncllm.tools import NONE, ToolCallStream

# vLLM's extra sampling switches, passed to SamplingParams as they are.
_VLLM_FLAGS = ("skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output")

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
    | {"suffix", "functions", "function_call", "modalities", "prediction", "audio"}
    | {"reasoning_effort"}
    | set(_VLLM_FLAGS)
    | {"chat_template_kwargs", "add_generation_prompt", "add_special_tokens", "request_id"}
    | {"use_beam_search", "length_penalty", "documents", "mm_processor_kwargs"}
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
    if body.get("functions"):
        raise GatewayError(INVALID_REQUEST, "functions (deprecated) are not supported: use tools")
    if body.get("best_of") not in (None, 1):
        raise GatewayError(INVALID_REQUEST, "best_of is not supported")
    for name in _VLLM_FLAGS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise GatewayError(INVALID_REQUEST, f"{name} must be true or false")
    ctk = body.get("chat_template_kwargs")
    if ctk is not None and not isinstance(ctk, dict):
        raise GatewayError(INVALID_REQUEST, "chat_template_kwargs must be an object")


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
        self.text: list[list[str]] = [[] for _ in range(n)]
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.tokens = 0

    def add(self, pieces: list[Piece]) -> None:
        for p in pieces:
            self.text[p.index].append(p.text)
            self.token_ids[p.index].extend(p.token_ids)
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
                        "created": io.model_created,
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
        if not chat and gp.tools:
            raise GatewayError(INVALID_REQUEST, "tools are for chat completions")
        tools = gp.tools if gp.tool_choice != NONE else None
        echo = body.get("echo") or False
        if not isinstance(echo, bool) or (echo and chat):
            raise GatewayError(INVALID_REQUEST, "echo must be true or false (completions only)")
        messages = None
        if chat:
            if "messages" not in body:
                raise GatewayError(INVALID_REQUEST, "messages is required")
            messages = parse_messages(body["messages"])
            prompts: list[Any] = [None]
        else:
            if "prompt" not in body:
                raise GatewayError(INVALID_REQUEST, "prompt is required")
            prompts = completion_prompts(body["prompt"])
            if body.get("suffix") is not None:
                if echo:
                    raise GatewayError(INVALID_REQUEST, "echo and suffix do not go together")
                prompts = with_suffix(io.tokenizer, prompts, body["suffix"])
        client = client_identity(request, io.settings.api_keys)
        io.admit(client=client)
        params = io.sampling_params(gp, default_max_tokens=None if chat else 16)
        for name in _VLLM_FLAGS:
            if body.get(name) is not None:
                setattr(params, name, body[name])
        try:
            params._verify()  # the flags' own rules (SamplingParams says which values it takes)
        except ValueError as e:
            raise GatewayError(INVALID_REQUEST, str(e)) from None
        id_lists = []
        for prompt in prompts:
            ids = await io.encode(messages, prompt, None, tools, body.get("chat_template_kwargs"))
            io.check_length(len(ids), gp.max_tokens, None)
            id_lists.append(ids)
        io.admit(client=client)
        api = "chat" if chat else "completions"
        gens = [
            io.generate(
                ids, params.clone(), gp.priority, api, io.new_request_id(api), client=client
            )
            for ids in id_lists
        ]
        gen = gens[0] if len(gens) == 1 else merge_pieces(gens, gp.n)
        out = Shape(
            n=gp.n * len(gens),
            per_prompt=gp.n,
            prompt_tokens=sum(len(ids) for ids in id_lists),
            echo=[echo_text(io.tokenizer, p) for p in prompts] if echo else None,
            token_ids=id_lists if gp.return_token_ids else None,
        )
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": io.model_name,
        }

        def tool_streams() -> list[ToolCallStream] | None:
            if not tools:
                return None
            return [ToolCallStream(gp.tool_choice, io.tool_parser) for _ in range(gp.n)]

        if params.structured_outputs is not None:
            # A constraint that does not compile is the caller's error: a 400 here, not a stream
            # that breaks (nor an error inside the collecting task group). The first output
            # comes after the engine compiled it.
            gen = await primed(gen)
        if stream:
            body_iter = self._sse(gen, meta, chat, out, include_usage, tool_streams())
            return StreamingResponse(
                body_iter,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._collect(request, gen, out.n)
        if result is None:  # the client went away; the request was aborted
            return Response(status_code=499)
        return json_response(self._full_body(result, meta, chat, out, tool_streams()))

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
        self,
        c: _Completion,
        meta: dict[str, Any],
        chat: bool,
        shape: Shape,
        tool_streams: list[ToolCallStream] | None = None,
    ) -> dict[str, Any]:
        choices = []
        for i, parts in enumerate(c.text):
            text = "".join(parts)
            lps = c.logprobs[i]
            extra = shape.extra(i, chat, c.token_ids[i])
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                finish = c.finish[i] or "stop"
                if tool_streams is not None:
                    ts = tool_streams[i]
                    ts.feed(text)
                    ts.finish()
                    finish = ts.finish_reason(finish) or finish
                    if ts.calls:
                        message["content"] = "".join(ts.content) or None
                        message["tool_calls"] = [call.to_openai() for call in ts.calls]
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": {"content": _chat_logprobs(lps)} if lps else None,
                        "finish_reason": finish,
                        **extra,
                    }
                )
            else:
                if shape.echo is not None:
                    text = shape.echo[shape.prompt_of(i)] + text
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": _legacy_logprobs(lps) if lps else None,
                        "finish_reason": c.finish[i] or "stop",
                        **extra,
                    }
                )
        body = {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": {
                "prompt_tokens": shape.prompt_tokens,
                "completion_tokens": c.tokens,
                "total_tokens": shape.prompt_tokens + c.tokens,
            },
        }
        if chat and shape.token_ids is not None:
            body["prompt_token_ids"] = shape.token_ids[0]
        return body

    async def _sse(
        self,
        gen: Any,
        meta: dict[str, Any],
        chat: bool,
        shape: Shape,
        include_usage: bool,
        tool_streams: list[ToolCallStream] | None = None,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_null = {"usage": None} if include_usage else {}
        n = shape.n

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return (
                b"data: "
                + orjson.dumps({**meta, "object": obj, "choices": choices, **extra})
                + b"\n\n"
            )

        tokens = 0
        offsets = [0] * n
        if chat:  # the role comes first, once per choice
            first = {"prompt_token_ids": shape.token_ids[0]} if shape.token_ids else {}
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
                **first,
            )
        elif shape.echo is not None or shape.token_ids is not None:
            # echo: the prompt first, as its choices' first text
            firsts = []
            for i in range(n):
                text = shape.echo[shape.prompt_of(i)] if shape.echo is not None else ""
                offsets[i] = len(text)
                firsts.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": None,
                        **shape.extra(i, chat, []),
                    }
                )
            yield event(firsts, **usage_null)
        try:
            async with aclosing(gen):
                async for pieces in gen:
                    choices = []
                    for p in pieces:
                        tokens += len(p.token_ids)
                        if not (p.text or p.finish_reason or p.logprobs or p.token_ids):
                            continue
                        extra = {"token_ids": p.token_ids} if shape.token_ids is not None else {}
                        if chat:
                            delta: dict[str, Any] = {"content": p.text} if p.text else {}
                            finish = p.finish_reason
                            if tool_streams is not None:
                                delta, finish = tool_delta(tool_streams[p.index], p)
                            if not (delta or finish or p.logprobs or extra):
                                continue
                            choices.append(
                                {
                                    "index": p.index,
                                    "delta": delta,
                                    "logprobs": {"content": _chat_logprobs(p.logprobs)}
                                    if p.logprobs
                                    else None,
                                    "finish_reason": finish,
                                    **extra,
                                }
                            )
                        else:
                            if not (p.text or p.finish_reason or p.logprobs or extra):
                                continue
                            choices.append(
                                {
                                    "index": p.index,
                                    "text": p.text,
                                    "logprobs": _legacy_logprobs(p.logprobs, offsets[p.index])
                                    if p.logprobs
                                    else None,
                                    "finish_reason": p.finish_reason,
                                    **extra,
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
                "prompt_tokens": shape.prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": shape.prompt_tokens + tokens,
            }
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"
