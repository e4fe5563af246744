"""The one path from a checked request to the engine, shared by the WebSocket and HTTP sides:
model name check, prompt encoding (chat template), admission limits, SamplingParams, then
`engine.generate` turned into per-sequence pieces, with metrics and a guaranteed abort."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio

from asyncllm.engine.engine_client import EngineClient, ServedModel
from asyncllm.gateway.chat_encode import encode_chat
from asyncllm.gateway.chat_render import render_chat
from asyncllm.gateway.limits import GatewayError, Limits, engine_dead_error
from asyncllm.gateway.metrics import Metrics
from asyncllm.gateway.settings import GatewaySettings
from asyncllm.outputs import RequestOutput
from asyncllm.protocol import (
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    SHUTTING_DOWN,
    GenParams,
    ProtocolError,
    StreamId,
)
from asyncllm.sampling_params import RequestOutputKind, SamplingParams
from asyncllm.tools import ToolCallParser, get_parser, parser_for_model

# Prompts up to this many characters are tokenized on the event loop (tens of microseconds),
# longer ones in a worker thread. A chat counts its rendered size: each message adds about
# this much template text (and a template pass), so many tiny messages go to the thread too.
INLINE_ENCODE_CHARS = 2048
TEMPLATE_CHARS_PER_MESSAGE = 32

# engine finish reasons -> protocol/OpenAI ones
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


@dataclass
class Piece:
    """What one output adds to sequence `index`."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None
    finish_reason: str | None  # set on the sequence's last piece


def format_logprobs(token_ids: list[int], entries: list[dict[int, Any]], k: int) -> list[dict]:
    """Engine logprobs (token id -> Logprob per position) -> JSON: the chosen token and its top-k."""
    out = []
    for tid, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(tid)
        top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
        out.append(
            {
                "id": tid,
                "token": chosen.decoded_token if chosen else None,
                "logprob": chosen.logprob if chosen else None,
                "top_logprobs": [
                    {"id": t, "token": lp.decoded_token, "logprob": lp.logprob} for t, lp in top
                ],
            }
        )
    return out


class EngineIO:
    def __init__(self, engine: EngineClient, settings: GatewaySettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        metrics.model_name = lambda: self.model_name  # the vLLM-named metrics' label
        # The prompt limit needs the model's length, known once the engine has loaded (bind()).
        self.limits = Limits(
            settings.max_connections,
            settings.max_queue,
            settings.max_prompt_tokens or 1 << 62,
            settings.retry_after,
            settings.max_streams_per_client,
            settings.max_connections_per_client,
        )
        self._ids = itertools.count()
        self._tool_parser: ToolCallParser | None = None
        self.model_created = int(time.time())
        # Graceful shutdown: once stopping, nothing new is admitted; the requests running then
        # (by request id) are aborted and end with a shutting_down error.
        self.stopping = False
        self._live: set[str] = set()
        self._stopped: set[str] = set()
        if engine.model_config is not None:
            self.bind()

    def bind(self) -> None:
        """Read what the loaded model decides: its name and length (the prompt limit)."""
        self.model_created = int(time.time())  # /v1/models' "created": when it was loaded
        max_prompt = self.max_model_len - 1
        if self.settings.max_prompt_tokens is not None:
            max_prompt = min(max_prompt, self.settings.max_prompt_tokens)
        self.limits.max_prompt_tokens = max_prompt
        self.max_tokens_default = self.settings.max_tokens_default or _generation_max_tokens(
            self.engine.model_config
        )

    @property
    def _model(self) -> ServedModel:
        mc = self.engine.model_config
        if mc is None:
            raise RuntimeError("the engine has not loaded its model yet (start it first)")
        return mc

    @property
    def tool_parser(self) -> ToolCallParser:
        """How this model writes tool calls: --tool-call-parser, or chosen from the tokenizer."""
        if self._tool_parser is None:
            name = self.settings.tool_call_parser or parser_for_model(self.tokenizer)
            self._tool_parser = get_parser(name)
        return self._tool_parser

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self._model.served_model_name

    @property
    def max_model_len(self) -> int:
        return int(self._model.max_model_len)

    # ---- checks -------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.engine.errored

    def check_alive(self, id: StreamId | None = None) -> None:
        if not self.alive:
            raise engine_dead_error(id, self.settings.retry_after)

    def check_model(self, model: str | None, id: StreamId | None = None) -> None:
        if model is not None and model != self.model_name:
            raise GatewayError(
                NOT_FOUND,
                f"model {model!r} is not served here; this server has {self.model_name!r}",
                id,
            )

    def sampling_params(
        self, gp: GenParams, id: StreamId | None = None, default_max_tokens: int | None = None
    ) -> SamplingParams:
        """No max_tokens means the server's default (--max-tokens-default, else the model's
        generation_config), else `default_max_tokens` (None: up to max_model_len). The model's
        other generation_config.json sampling values fill the fields the request leaves out."""
        defaults = dict(getattr(self._model, "generation_defaults", None) or {})
        defaults.pop("max_tokens", None)  # max_new_tokens: the server's default above
        kw = {**defaults, **gp.sampling_kwargs()}
        kw.setdefault("max_tokens", getattr(self, "max_tokens_default", None) or default_max_tokens)
        try:
            sp = SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise GatewayError(INVALID_REQUEST, str(e), id) from None
        sp.output_kind = RequestOutputKind.DELTA
        return sp

    # ---- prompts ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _encode_chat_sync(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt")
        # special-token text in content stays text; the template holds any BOS token
        return encode_chat(
            tok, messages, render=lambda msgs: render_chat(tok, msgs, tools, template_kwargs)
        )

    def _encode_text_sync(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.engine.vocab_size or len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                )
            return list(prompt)
        return list(self.tokenizer.encode(prompt))

    async def encode(
        self,
        messages: list[dict[str, Any]] | None,
        prompt: str | list[int] | None,
        id: StreamId | None,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a chat (messages) or a plain prompt, checked against the prompt limit.
        A long prompt is tokenized in a worker thread, so it cannot stall every other stream; a
        short one right here: the hop to a thread and back costs more loop time than the
        tokenizer does, and at a burst of hundreds of new streams it was most of their TTFT."""
        try:
            if messages is not None:
                size = sum(len(m["content"] or "") + TEMPLATE_CHARS_PER_MESSAGE for m in messages)
                if tools:
                    size += INLINE_ENCODE_CHARS  # rendering tools' schemas: off the loop

                def fn(msgs: Any) -> list[int]:
                    return self._encode_chat_sync(msgs, tools, template_kwargs)

                arg: Any = messages
            else:
                assert prompt is not None
                size = len(prompt)  # characters, or token ids to range-check
                fn, arg = self._encode_text_sync, prompt  # type: ignore[assignment]
            if size <= INLINE_ENCODE_CHARS:
                ids = fn(arg)
            else:
                ids = await anyio.to_thread.run_sync(fn, arg)
        except ProtocolError:
            raise
        except Exception as e:  # template errors, bad ids: the user's input, not our crash
            raise GatewayError(INVALID_REQUEST, f"cannot encode the prompt: {e}", id) from None
        if not ids:
            raise GatewayError(INVALID_REQUEST, "the prompt encodes to no tokens", id)
        self.limits.check_prompt(len(ids), id)
        return ids

    def check_length(self, prompt_tokens: int, max_tokens: int | None, id: StreamId | None) -> None:
        """A prompt plus an explicit max_tokens beyond the context is refused, as vLLM does."""
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            raise GatewayError(
                INVALID_REQUEST,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"prompt, {max_tokens} in the completion). Please reduce the length of the "
                "prompt or completion.",
                id,
            )

    def admit(self, id: StreamId | None = None, client: tuple[str, ...] = ()) -> None:
        if self.stopping:
            raise self.shutting_down_error(id)
        self.check_alive(id)
        self.limits.check_queue(id)
        self.limits.client_streams.check(client, id)

    def shutting_down_error(self, id: StreamId | None = None) -> GatewayError:
        return GatewayError(
            SHUTTING_DOWN,
            "the server is shutting down; send the request again (to another replica)",
            id,
            status=503,
            retry_after=self.settings.retry_after,
        )

    @property
    def live_requests(self) -> int:
        return len(self._live)

    async def stop_generations(self) -> None:
        """Admit nothing more and abort every running request; returns once the engine has let
        them all go. Each one's generate() then raises the shutting_down error."""
        self.stopping = True

        async def abort(rid: str) -> None:
            try:
                await self.engine.abort(rid)
            except Exception:  # a dead engine has nothing left to abort
                pass

        async with anyio.create_task_group() as tg:
            for rid in list(self._live):
                self._stopped.add(rid)
                tg.start_soon(abort, rid)

    # ---- generation ---------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int,
        api: str,
        request_id: str,
        id: StreamId | None = None,
        on_pieces: Callable[[list[Piece]], None] | None = None,
        client: tuple[str, ...] = (),
    ) -> AsyncIterator[list[Piece]]:
        """Yield the pieces of each engine output. Leaving early (break, cancel, disconnect)
        aborts the request. Engine failures come out as GatewayError(internal).

        With `on_pieces`, each output's pieces go to `on_pieces(pieces)` instead, called on the
        loop as the engine delivers them (the engine's sink: no task switch per output), and the
        generator yields nothing: iterate it to the end to run the request."""
        self.limits.client_streams.acquire(client, id)  # `client`: see client_identity()
        holds_slot = True

        def release_slot() -> None:
            nonlocal holds_slot
            if holds_slot:
                holds_slot = False
                self.limits.client_streams.release(client)

        m = self.metrics
        m.prompt_tokens.inc(len(prompt_ids))
        conv = _Converter(self.limits, m, params, time.monotonic())
        outcome = "error"
        stopped = self._stopped
        self._live.add(request_id)
        try:
            if self.stopping:
                raise self.shutting_down_error(id)
            sink: Callable[[RequestOutput], None] | None = None
            if on_pieces is not None:

                def sink(out: RequestOutput) -> None:
                    if request_id not in stopped:  # not the abort's own last output
                        pieces = conv(out)
                        if conv.finished:
                            # Its done may reach the client before this generator ends, and
                            # the client may start its next stream at once: not over its cap.
                            release_slot()
                        on_pieces(pieces)

            gen = self.engine.generate(
                {"prompt_token_ids": prompt_ids},
                params,
                request_id=request_id,
                priority=priority,
                sink=sink,
            )
            async with aclosing(gen):
                async for out in gen:
                    if request_id in stopped:
                        break
                    pieces = conv(out)
                    if on_pieces is not None:
                        on_pieces(pieces)
                    else:
                        yield pieces
            if request_id in stopped:
                outcome = "cancelled"
                raise self.shutting_down_error(id)
            if conv.finished:
                outcome = _summary_outcome(conv.reasons)
                m.e2e.observe(time.monotonic() - conv.start)
        except GeneratorExit:
            outcome = "cancelled"
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        except ProtocolError:  # (a ValueError too) ours, e.g. shutting_down: as it is
            raise
        except ValueError as e:  # the engine refused the request (add_request's checks)
            raise GatewayError(INVALID_REQUEST, str(e), id) from None
        except Exception as e:
            if not self.alive:
                raise engine_dead_error(id, self.settings.retry_after) from None
            raise GatewayError(INTERNAL, f"generation failed: {type(e).__name__}: {e}", id) from e
        finally:
            self._live.discard(request_id)
            stopped.discard(request_id)
            release_slot()
            conv.release_queue_slot()
            if not conv.finished:
                # The generator's own cleanup should abort; make sure, even when cancelled.
                with anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + 10  # a hung engine cannot hang us
                    try:
                        await self.engine.abort(request_id)
                    except Exception:
                        pass
            m.requests.labels(api, outcome).inc()


class _Converter:
    """One request's engine outputs -> pieces, with its metrics (TTFT, inter-token latency,
    tokens) and its queue slot, released at its first token."""

    def __init__(self, limits: Limits, metrics: Metrics, params: SamplingParams, start: float):
        self.limits = limits
        self.m = metrics
        self.params = params
        self.k = params.logprobs or 0
        self.start = start
        self.last: dict[int, float] = {}
        self.queued = True
        limits.queued += 1
        self.finished = False
        self.final_pieces: list[Piece] = []
        self.ended: set[int] = set()  # indexes whose last piece went out
        self.reasons: set[str] = set()

    def release_queue_slot(self) -> None:
        if self.queued:
            self.queued = False
            self.limits.queued -= 1

    def __call__(self, out: RequestOutput) -> list[Piece]:
        now = time.monotonic()
        m = self.m
        pieces = []
        for c in out.outputs:
            if c.index in self.ended:
                # An n > 1 request's final output repeats a choice that ended earlier.
                continue
            n_new = len(c.token_ids)
            if n_new:
                if self.queued:
                    self.release_queue_slot()
                    m.ttft.observe(now - self.start)
                prev = self.last.get(c.index)
                if prev is not None:
                    m.itl.observe((now - prev) / n_new, n_new)
                self.last[c.index] = now
                m.generation_tokens.inc(n_new)
            lps = None
            if self.params.logprobs is not None and c.logprobs:
                lps = format_logprobs(c.token_ids, c.logprobs, self.k)
            fr = _FINISH.get(c.finish_reason, c.finish_reason) if c.finish_reason else None
            if fr is not None:
                self.ended.add(c.index)
                self.reasons.add(fr)
            pieces.append(Piece(c.index, c.text, list(c.token_ids), lps, fr))
        if out.finished:
            self.finished = True
            self.final_pieces = pieces
        return pieces


def _generation_max_tokens(model_config: Any) -> int | None:
    """The model's generation_config.json max_new_tokens (or max_length), if it sets one."""
    import json
    import os

    path = os.path.join(str(getattr(model_config, "path", "")), "generation_config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    v = cfg.get("max_new_tokens")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _summary_outcome(reasons: set[str]) -> str:
    if not reasons:
        return "stop"
    return sorted(reasons)[0] if len(reasons) > 1 else next(iter(reasons))
