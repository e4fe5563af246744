"""The synchronous engine core: add_request / abort_request / step.

Each step: the scheduler picks tokens to compute, the model runner computes them, the sampler picks
the next token of every sequence whose tokens are all computed, the detokenizer turns tokens into
text and checks stop strings, and the step's RequestOutputs are built per each request's
output_kind. Nothing here is thread-safe: AsyncLLMEngine drives it from one thread.

A step is launched, then resolved. Launching schedules, builds the inputs and queues the forward
and the sampling on the device; resolving waits for the sampled ids and does the host's per-token
work (finish rules, detokenizing, outputs). With async scheduling one step stays in flight: step
N+1 is launched (its decodes read step N's tokens on the device) before step N is resolved, so
the host's work for N overlaps the GPU's for N+1. A sequence that finished at N has wasted one row
of N+1, whose token is dropped; sampling that reads a request's generated tokens (penalties,
min_tokens) waits for N to resolve, after N+1's forward is queued; so does a constrained row's,
whose bitmask needs N's token in its matcher: N's tokens are accepted first, then N+1's mask is
filled on the grammar's worker thread while the rest of N's host work runs, then N+1 samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm import envs
from asyncllm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from asyncllm.engine.executor import Executor, UniProcExecutor
from asyncllm.engine.grammar import ACCEPTED, REJECTED, GrammarBackend, PendingFill, StepBitmask
from asyncllm.engine.model_runner import ModelRunner
from asyncllm.engine.models import kv_cache_window
from asyncllm.engine.output_builder import collect_outputs, make_output
from asyncllm.engine.sampler import (
    PendingSample,
    Sampler,
    SamplerRow,
    compute_prompt_logprobs,
    needs_history,
)
from asyncllm.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from asyncllm.engine.sequence import Request, Sequence, SequenceStatus
from asyncllm.outputs import EngineStats, Logprob, RequestOutput
from asyncllm.sampling_params import SamplingParams, default_sampling_params

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]
FINISHED = SequenceStatus.FINISHED


@dataclass
class _LaunchedStep:
    """A step whose forward (and usually sampling) is queued on the device."""

    row_seqs: list[Sequence]  # one per sampled row
    logits: torch.Tensor | None  # sample logits, kept only while sampling is deferred
    sample: PendingSample | None = None
    # A deferred sampling's bitmask, started while the previous step was resolved: a fill on
    # the grammar's worker thread, a mask filled in place, or None (no grammar rows).
    mask: PendingFill | StepBitmask | None = None
    mask_started: bool = False


def _eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        tokenizer: Any,
        runner: ModelRunner,
        executor: Executor | None = None,
    ):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.runner = runner
        # World size 1: the runner here; tensor parallel: every rank (tp_executor).
        self.executor: Executor = executor if executor is not None else UniProcExecutor(runner)
        self.vocab_size = int(model_config.hf_config.vocab_size)
        self.eos_token_ids = _eos_ids(model_config.hf_config, tokenizer)
        self.eos_token_ids.update(model_config.generation_eos_token_ids)
        self.block_manager = BlockManager(
            cache_config.num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            kv_cache_window(model_config.hf_config),
        )
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.async_scheduling = scheduler_config.async_scheduling
        # Host bookkeeping shortcuts (same results; ASYNCLLM_HOST_FASTPATH=0 turns them off).
        self._fastpath = envs.host_fastpath()
        self._in_flight: _LaunchedStep | None = None
        self._grammar: GrammarBackend | None = None  # built at the first constrained request
        self._grammar_overlap = envs.grammar_overlap()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0
        self.num_requests = 0

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        from asyncllm.engine.engine_builder import build_engine_parts

        return cls(*build_engine_parts(args))

    @property
    def grammar(self) -> GrammarBackend:
        if self._grammar is None:
            self._grammar = GrammarBackend(
                self.tokenizer,
                self.vocab_size,
                self.eos_token_ids,
                pinned=self.model_config.device.type == "cuda",
            )
        return self._grammar

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks and the grammar's fill thread, if any (idempotent)."""
        self.executor.shutdown()
        if self._grammar is not None:
            self._grammar.close()

    # ---- requests ---------------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (vLLM's
        `--generation-config auto`); used when a request brings none."""
        return default_sampling_params(self.model_config.generation_defaults)

    def encode_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"unknown prompt fields {sorted(unknown)}")
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if text is None and ids is None:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a string, a dict or token ids, got {type(prompt)}")
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}")
            if not text:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(text)
        else:
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            ids = list(ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt_token_ids has ids outside the vocabulary [0, {self.vocab_size}): "
                    f"{bad[:5]}"
                )
        if not ids:
            raise ValueError("prompt is empty (no tokens)")
        return text, ids

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError("each message must be a dict with a string 'role'")
            if not isinstance(m.get("content"), str):
                raise ValueError("each message must have a string 'content'")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt")
        kwargs.setdefault("add_generation_prompt", True)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        # The template already holds any BOS token.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = (params or self.get_default_sampling_params()).clone()
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        params.verify_vocab(self.vocab_size)
        max_seqs = self.scheduler_config.max_num_seqs
        if params.n > max_seqs:
            # It would wait forever for n free sequence slots (and hold up its priority).
            raise ValueError(
                f"n={params.n} is more than max_num_seqs={max_seqs}, the most sequences the "
                "engine runs at once: lower n or raise max_num_seqs"
            )
        text, ids = self.encode_prompt(prompt)
        max_len = self.model_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens; max_model_len is {max_len}, which leaves no room "
                "to generate: shorten the prompt or raise max_model_len"
            )
        total = min(len(ids) + (params.max_tokens or max_len), max_len)
        chunk = self.scheduler_config.max_num_batched_tokens
        blocks = self.block_manager.max_blocks_held(total, chunk) * params.n
        if blocks > self.cache_config.num_blocks:
            raise ValueError(
                f"this request needs up to {blocks} KV blocks but the cache has "
                f"{self.cache_config.num_blocks}: lower max_tokens or n, or enlarge the KV cache"
            )
        # Kept under ignore_eos too: min_tokens masks EOS either way (the finish rule checks
        # ignore_eos).
        params._eos_token_ids = set(self.eos_token_ids)
        compiled = None
        if params.structured_outputs is not None:
            compiled = self.grammar.compile(params.structured_outputs)
        req = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            compiled_grammar=compiled,
        )
        seq = self._new_seq(req, 0, list(ids))
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.num_requests += 1

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(
            request=req,
            index=index,
            token_ids=token_ids,
            num_prompt_tokens=len(req.prompt_token_ids),
        )
        p = req.params
        if p.seed is not None:
            seq.generator = torch.Generator(device=self.model_config.device)
            seq.generator.manual_seed((p.seed * 1_000_003 + index) % (2**63))
        if p.detokenize:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p)
        if p.logprobs is not None:
            seq.logprobs = []
        if req.compiled_grammar is not None:
            seq.matcher = self.grammar.matcher(req.compiled_grammar)
        return seq

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
                    if seq.detokenizer is not None:
                        seq.detokenizer.finish()
            req.forked = True  # an aborted n>1 parent will never fork
            req.finished_time = time.monotonic()
            outputs.append(make_output(req, final=True))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_blocks_cached=bm.num_cached_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            num_steps=self.num_steps,
            num_requests=self.num_requests,
        )

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the step it resolves (with async scheduling, the
        one launched by the previous call)."""
        sched = self.scheduler.schedule()
        # The forward of the new step is queued first: it needs no bitmask, and the GPU runs
        # it while the host resolves `prev`, accepts its tokens and fills the new step's mask.
        launched = self._launch(sched) if not sched.empty else None
        prev, self._in_flight = self._in_flight, None
        deferred = launched is not None and launched.sample is None and launched.logits is not None
        outputs: list[RequestOutput] = []
        try:
            if prev is not None:
                outputs = self._resolve(prev, launched if deferred else None)
            if deferred and launched is not None:
                self._sample(launched)  # it needed the tokens `prev` just delivered
        except BaseException:
            if launched is not None and isinstance(launched.mask, PendingFill):
                launched.mask.join()  # no fill may outlive the step that started it
            raise
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs = self._resolve(launched)
        return outputs

    def _launch(self, sched: SchedulerOutput) -> _LaunchedStep:
        self.num_steps += 1
        scheduled = sched.scheduled
        prev = self._in_flight
        prev_tokens = prev.sample.tokens if prev is not None and prev.sample is not None else None
        logits = self.executor.execute(sched.step, prev_tokens)

        for i, (lg, start) in logits.prompt_logits.items():
            self._add_prompt_logprobs(scheduled[i].seq, lg, start)

        # Account the computed tokens before sampling adds new ones.
        fast = self._fastpath
        bm = self.block_manager
        bs = bm.block_size
        for s in scheduled:
            seq = s.seq
            if len(seq.token_ids) == seq.num_prompt_tokens and seq.num_pending == 0:
                self.prompt_tokens_total += s.num_new_tokens
            seq.num_computed_tokens += s.num_new_tokens
            # Publish newly full blocks only when one may have been completed (a block fills
            # once per block_size tokens); inlined, as in _resolve: it runs per row per step.
            if (
                not fast
                or min(seq.num_computed_tokens, len(seq.token_ids)) // bs > seq.num_hashed_blocks
            ):
                bm.register_computed(seq)

        if logits.sample_logits is None:
            return _LaunchedStep([], None)
        row_src, row_seqs = self._sampling_rows(scheduled, logits.sample_index)
        lg = logits.sample_logits
        if row_src != list(range(lg.shape[0])):
            lg = lg[self.runner._to_device(row_src, torch.int64)]
        for seq in row_seqs:
            seq.num_pending += 1
        step = _LaunchedStep(row_seqs, lg)
        # A sequence with two pending tokens lacks the in-flight one on the host: its penalties
        # cannot be computed, nor its grammar's bitmask (the matcher has not seen that token).
        if not any(
            s.num_pending > 1 and (s.matcher is not None or needs_history(s.request.params))
            for s in row_seqs
        ):
            self._sample(step)
        return step

    def _sample(self, step: _LaunchedStep) -> None:
        assert step.logits is not None
        rows = [self._row(s) for s in step.row_seqs]
        if step.mask_started:
            mask = step.mask
            bitmask = mask.result() if isinstance(mask, PendingFill) else mask
            step.mask = None
        else:
            bitmask = self._bitmask(step.row_seqs)
        step.sample = self.sampler.launch(step.logits, rows, bitmask)
        step.logits = None
        for j, seq in enumerate(step.row_seqs):
            seq.pending_row = j

    def _grammar_rows(self, row_seqs: list[Sequence]) -> tuple[list[int], list[Any]]:
        """The rows that get a mask, and their matchers. A sequence that finished while its
        step was in flight keeps its row unmasked (its token is void), as does one whose
        matcher has ended (it finishes with the token just accepted)."""
        idx: list[int] = []
        matchers: list[Any] = []
        for j, s in enumerate(row_seqs):
            m = s.matcher
            if m is not None and s.status is not FINISHED and s.grammar_state == ACCEPTED:
                idx.append(j)
                matchers.append(m)
        return idx, matchers

    def _bitmask(self, row_seqs: list[Sequence]) -> StepBitmask | None:
        """The grammar rows' token bitmask, filled on the host; None (no cost) without any."""
        if self._grammar is None:
            return None  # no request was ever constrained
        idx, matchers = self._grammar_rows(row_seqs)
        if not idx:
            return None
        return self._grammar.fill(len(row_seqs), matchers, idx)

    def _start_mask(self, step: _LaunchedStep) -> None:
        """Starts the deferred `step`'s bitmask once the matchers have the tokens just resolved:
        on the grammar's worker thread, so the rest of the resolve runs beside it
        (ASYNCLLM_GRAMMAR_OVERLAP=0: here, at once)."""
        step.mask_started = True
        idx, matchers = self._grammar_rows(step.row_seqs)
        if not idx:
            return
        g = self.grammar
        if self._grammar_overlap:
            step.mask = g.fill_async(len(step.row_seqs), matchers, idx)
        else:
            step.mask = g.fill(len(step.row_seqs), matchers, idx)

    def _accept_grammar(self, row_seqs: list[Sequence], token_ids: list[int]) -> None:
        """The constrained rows' matchers accept their new tokens, in one call. Every such token
        was drawn under its row's mask, so a matcher takes it even where another rule (EOS, a
        stop string, max_tokens) ends the sequence with it: its state then no longer matters."""
        matchers: list[Any] = []
        tokens: list[int] = []
        seqs: list[Sequence] = []
        for j, seq in enumerate(row_seqs):
            if seq.matcher is not None and seq.status is not FINISHED:
                matchers.append(seq.matcher)
                tokens.append(token_ids[j])
                seqs.append(seq)
        if matchers:
            for seq, state in zip(seqs, self.grammar.accept(matchers, tokens), strict=True):
                seq.grammar_state = state

    def _resolve(
        self, step: _LaunchedStep, deferred: _LaunchedStep | None = None
    ) -> list[RequestOutput]:
        """Wait for `step`'s sampled ids and do the host's work for them. `deferred`: the step
        launched after it, whose sampling waits for these tokens: its bitmask is started as
        soon as the matchers have them, before the per-token work below."""
        if step.sample is None:
            return []  # prompt chunks only: nothing was sampled
        out = step.sample.result()
        if self._grammar is not None:
            self._accept_grammar(step.row_seqs, out.token_ids)
            if deferred is not None:
                self._start_mask(deferred)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        fast = self._fastpath
        bm = self.block_manager
        bs = bm.block_size
        append_token = self._append_token
        for j, seq in enumerate(step.row_seqs):
            if seq.status is FINISHED:
                continue  # finished or aborted while this step ran: its token is void
            seq.num_pending -= 1
            append_token(seq, out.token_ids[j], out.logprobs[j], out.ranks[j], out.top_logprobs[j])
            if seq.status is not FINISHED:
                # The same check as in _launch (every token of every step passes here).
                if (
                    not fast
                    or min(seq.num_computed_tokens, len(seq.token_ids)) // bs
                    > seq.num_hashed_blocks
                ):
                    bm.register_computed(seq)
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            touched[req.request_id] = req
        return collect_outputs(touched, self.requests)

    def _sampling_rows(
        self, scheduled: list[ScheduledSeq], sample_index: list[int]
    ) -> tuple[list[int], list[Sequence]]:
        """The sequences that sample, and the logits row each reads. An n>1 request that just
        finished its prompt forks here into n sequences sharing the prompt's blocks."""
        row_src: list[int] = []
        seqs: list[Sequence] = []
        for row, i in enumerate(sample_index):
            seq = scheduled[i].seq
            req = seq.request
            family = [seq]
            if req.params.n > 1 and not req.forked:
                req.forked = True
                for k in range(1, req.params.n):
                    child = self._new_seq(req, k, list(seq.token_ids))
                    child.num_computed_tokens = seq.num_computed_tokens
                    self.block_manager.fork(seq, child)
                    req.seqs.append(child)
                    self.scheduler.add_running(child)
                    family.append(child)
            for s in family:
                row_src.append(row)
                seqs.append(s)
        return row_src, seqs

    def _row(self, seq: Sequence) -> SamplerRow:
        params = seq.request.params
        # The sampler reads the generated tokens only for penalties and min_tokens; copying them
        # for every row of every step is O(length) per token.
        history = not self._fastpath or needs_history(params)
        return SamplerRow(
            params=params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.output_token_ids if history else [],
            generator=seq.generator,
        )

    def _add_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        req = seq.request
        k = req.params.prompt_logprobs or 0
        targets = seq.token_ids[start + 1 : start + 1 + logits.shape[0]]
        # Row i is the distribution of prompt position start + 1 + i; position 0 has none.
        entries: list[dict[int, Logprob] | None] = [None] if start == 0 else []
        for d in compute_prompt_logprobs(logits, targets, k):
            entries.append(
                {
                    tid: Logprob(lp, rank, decode_token(self.tokenizer, tid))
                    for tid, (lp, rank) in d.items()
                }
            )
        req.add_prompt_logprobs(0 if start == 0 else start + 1, entries)

    def _append_token(
        self,
        seq: Sequence,
        tok: int,
        logprob: float,
        rank: int,
        top: list[tuple[int, float]] | None,
    ) -> None:
        p = seq.request.params
        seq.token_ids.append(tok)
        self.generation_tokens_total += 1
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = {tok: Logprob(logprob, rank, decode_token(self.tokenizer, tok))}
            for r, (tid, lp) in enumerate(top or [], start=1):
                if tid not in entry:
                    entry[tid] = Logprob(lp, r, decode_token(self.tokenizer, tid))
            seq.logprobs.append(entry)

        n_out = len(seq.token_ids) - seq.num_prompt_tokens
        reason: str | None = None
        stop_reason: int | str | None = None
        stop_token = False
        if n_out >= p.min_tokens:
            if tok in p._eos_token_ids and not p.ignore_eos:
                reason, stop_token = "stop", True
            elif tok in p.stop_token_ids:
                reason, stop_reason, stop_token = "stop", tok, True
        if seq.detokenizer is not None and not (stop_token and not p.include_stop_str_in_output):
            matched = seq.detokenizer.add_tokens([tok])
            if matched is not None and reason is None:
                reason, stop_reason = "stop", matched
        # The matcher took `tok` in _accept_grammar, before the mask of the next step.
        if seq.grammar_state != ACCEPTED and reason is None:
            if seq.grammar_state == REJECTED:
                # Cannot happen for a token drawn under the mask; end rather than emit garbage.
                logger.error("request %s: token %d breaks its grammar", seq.request.request_id, tok)
            reason = "stop"  # REJECTED, or TERMINATED: the grammar is complete
        # Sequence.ends_by_length(count_pending=False), inlined: it runs for every token.
        if reason is None and (
            (p.max_tokens is not None and n_out >= p.max_tokens)
            or len(seq.token_ids) >= self.model_config.max_model_len
        ):
            reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            if seq.detokenizer is not None and not isinstance(stop_reason, str):
                seq.detokenizer.finish()
            self.scheduler.finish(seq)
