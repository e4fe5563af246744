"""vLLM's utility routes: GET /version, POST /tokenize and /detokenize, GET /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from asyncllm.gateway.engine_io import EngineIO
from asyncllm.gateway.limits import GatewayError
from asyncllm.gateway.openai import json_response, read_json
from asyncllm.protocol import INVALID_REQUEST, NOT_FOUND, parse_messages, parse_prompt


class UtilityRoutes:
    def __init__(self, io: EngineIO):
        self.io = io

    async def version(self, request: Request) -> Response:
        from asyncllm import __version__

        return json_response({"version": __version__})

    async def model(self, request: Request) -> Response:
        io = self.io
        mid = request.path_params["model_id"]
        if mid != io.model_name:
            raise GatewayError(NOT_FOUND, f"model {mid!r} is not served here")
        return json_response(
            {
                "id": io.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "asyncllm",
                "max_model_len": io.max_model_len,
            }
        )

    async def tokenize(self, request: Request) -> Response:
        """{"prompt": str} or {"messages": [...]} (chat template applied) -> token ids."""
        io = self.io
        body = await read_json(request, io.settings.max_frame_bytes)
        io.check_model(body.get("model") if isinstance(body.get("model"), str) else None)
        if "messages" in body:
            ids = await io.encode(parse_messages(body["messages"]), None, None)
        elif isinstance(body.get("prompt"), str):
            add = body.get("add_special_tokens", True)
            if not isinstance(add, bool):
                raise GatewayError(INVALID_REQUEST, "add_special_tokens must be true or false")
            ids = list(io.tokenizer.encode(parse_prompt(body["prompt"]), add_special_tokens=add))
        else:
            raise GatewayError(INVALID_REQUEST, "send prompt (a string) or messages")
        out: dict[str, Any] = {"count": len(ids), "max_model_len": io.max_model_len, "tokens": ids}
        return json_response(out)

    async def detokenize(self, request: Request) -> Response:
        io = self.io
        body = await read_json(request, io.settings.max_frame_bytes)
        io.check_model(body.get("model") if isinstance(body.get("model"), str) else None)
        tokens = body.get("tokens")
        vocab = getattr(io.engine, "vocab_size", None) or len(io.tokenizer)
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise GatewayError(INVALID_REQUEST, f"tokens must be a list of ids in [0, {vocab})")
        return json_response({"prompt": io.tokenizer.decode(tokens)})
