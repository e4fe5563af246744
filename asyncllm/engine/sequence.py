"""One request, and the sequences (samples) it generates.

A request with `n > 1` is prefilled once as a single sequence; when its prompt is computed it forks
into `n` sequences that share the prompt's KV blocks (copy-on-write at divergence).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncllm.outputs import Logprob, PromptLogprobs, SampleLogprobs
from asyncllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from asyncllm.engine.detokenizer import IncrementalDetokenizer

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample index within the request (CompletionOutput.index)
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Async scheduling: tokens sampled on the device whose ids have not reached the host yet
    # (at most 2: the in-flight step's and the one being launched). They count in num_tokens;
    # the newest is row `pending_row` of its step's sampled-token tensor.
    num_pending: int = 0
    pending_row: int = -1
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    # leading table entries looked at for release (sliding windows): NULL_BLOCK where released
    num_released_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    # xgrammar GrammarMatcher of a constrained request; it has accepted every known output token.
    matcher: Any = None
    # grammar.ACCEPTED, or TERMINATED / REJECTED once the matcher has ended with the last token
    # (it gets no more masks; the sequence ends "stop" unless another rule ended it first)
    grammar_state: int = 0
    cumulative_logprob: float = 0.0
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # How much of the output has been handed to the user already (DELTA outputs).
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    num_sent_logprobs: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def ends_by_length(self, max_model_len: int, count_pending: bool = True) -> bool:
        """The finish rule "length": max_tokens outputs or max_model_len tokens. The engine
        applies it to the known tokens; the scheduler counts the pending ones too (a sequence
        whose pending tokens reach it will finish when they arrive, so computing one more token
        for it would be wasted)."""
        pending = self.num_pending if count_pending else 0
        max_tokens = self.request.params.max_tokens
        n_out = self.num_output_tokens + pending
        total = len(self.token_ids) + pending
        return (max_tokens is not None and n_out >= max_tokens) or total >= max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def output_text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer is not None else ""

    @property
    def sort_key(self) -> tuple[int, float, int]:
        # Lower priority value first; ties by arrival, then by creation.
        return (self.request.priority, self.request.arrival_time, self.seq_id)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: the children exist
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    compiled_grammar: Any = None  # xgrammar CompiledGrammar of params.structured_outputs

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and (self.forked or self.params.n == 1)

    def add_prompt_logprobs(self, start: int, entries: list[dict[int, Logprob] | None]) -> None:
        """`entries` are those of prompt positions start, start+1, ...; positions already known
        are skipped (a sequence preempted in mid-prefill computes its first chunks again)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = []
        have = len(self.prompt_logprobs)
        if start > have:
            raise ValueError(f"prompt logprobs from position {start}, but only {have} are known")
        self.prompt_logprobs.extend(entries[have - start :])
