"""LLM: offline batches, the vLLM way."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence as Seq
from typing import Any

from asyncllm.config import EngineArgs
from asyncllm.engine.llm_engine import LLMEngine, PromptType
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """`LLM(model=None)` loads the default model; keyword arguments are EngineArgs fields."""

    def __init__(self, model: str | os.PathLike[str] | None = None, **kwargs: Any):
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (tensor_parallel_size > 1); idempotent. They are also
        stopped when this object is collected or the interpreter exits."""
        self.llm_engine.shutdown()

    def __del__(self) -> None:
        # Dropped without shutdown(): the ranks' monitor thread keeps their group alive, so
        # stop them here rather than at interpreter exit.
        engine = self.__dict__.get("llm_engine")
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - interpreter teardown
                pass

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate(prompts)` without sampling params uses: the model's
        generation_config.json values over SamplingParams' defaults (vLLM's)."""
        return self.llm_engine.get_default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm, priority, chat=False)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # one conversation
        kw = chat_template_kwargs or {}
        prompts = [
            {"prompt_token_ids": self.llm_engine.apply_chat_template(conv, **kw)}
            for conv in messages
        ]
        return self._run(prompts, sampling_params, use_tqdm, None, chat=True)

    def _run(self, prompts, sampling_params, use_tqdm, priority, chat: bool) -> list[RequestOutput]:
        n = len(prompts)
        if sampling_params is None:
            sampling_params = self.llm_engine.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * n
        else:
            params_list = list(sampling_params)
            if len(params_list) != n:
                raise ValueError(
                    f"got {n} prompts and {len(params_list)} sampling params: pass one or one each"
                )
        if priority is not None and len(priority) != n:
            raise ValueError(f"got {n} prompts and {len(priority)} priorities")
        engine = self.llm_engine
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                p = params.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY
                rid = f"llm-{next(self._ids)}"
                engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
                order[rid] = i
            results: list[RequestOutput | None] = [None] * n
            bar = None
            if use_tqdm and n > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=n, desc="Generating", unit="req", dynamic_ncols=True)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            # Leave the engine clean for the next call: nothing half-added stays behind.
            engine.abort_request(list(order))
            raise
        # Chat requests carry no prompt text (they were tokenised with the template).
        return [r for r in results if r is not None]
