"""Sampling parameters, named and defaulted as in vLLM so that user habits carry over.

`PARAM_RANGES` is the one table of the numeric fields' types and ranges: SamplingParams checks
against it, and so does the WebSocket/HTTP params parser (asyncllm/protocol.py), so a value out of
range gets the same message whichever way it came in. No torch here (the client imports this).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the whole text and token ids so far
    DELTA = 1  # every output carries only what is new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


_GREEDY_EPS = 1e-5

# What float32 (the sampler's arithmetic) can hold. A top_p under the smallest normal float32
# becomes 0 there and cuts every token; a repetition penalty or temperature divides or
# multiplies logits, so it stays within FACTOR_MIN..FACTOR_MAX: a logit up to 1e8 in magnitude
# then stays finite (1e-50 became 0 in float32: infinite logits, NaN picks).
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
FACTOR_MIN, FACTOR_MAX = 1e-30, 1e30


@dataclass(frozen=True)
class ParamRange:
    """A numeric field's type and bounds (None: unbounded; `open`: the bound itself is out).
    Booleans are not numbers here, nor are NaN and infinities."""

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    what: str | None = None  # the message's wording, where the bounds alone would mislead

    def describe(self) -> str:
        if self.what is not None:
            return self.what
        kind = "an integer" if self.integer else "a number"
        lo, hi = _fmt(self.lo), _fmt(self.hi)
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{kind} in {left}{lo}, {hi}{right}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {hi}"
        return kind

    def accepts(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return False
        if not self.integer and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


def _fmt(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


PARAM_RANGES: dict[str, ParamRange] = {
    "n": ParamRange(True, lo=1),
    "presence_penalty": ParamRange(False, -2.0, 2.0),
    "frequency_penalty": ParamRange(False, -2.0, 2.0),
    "repetition_penalty": ParamRange(
        False, FACTOR_MIN, FACTOR_MAX, what="a number in [1e-30, 1e30]"
    ),
    "temperature": ParamRange(False, 0.0, FACTOR_MAX, what="a number in [0, 1e30]"),
    "top_p": ParamRange(
        False, FLOAT32_MIN_NORMAL, 1.0, what="a number in [1.175e-38, 1] (float32 holds no less)"
    ),
    "top_k": ParamRange(True, lo=-1, what="0 or -1 (off) or a positive integer"),
    "min_p": ParamRange(False, 0.0, 1.0),
    "seed": ParamRange(True),
    "max_tokens": ParamRange(True, lo=1),
    "min_tokens": ParamRange(True, lo=0),
    "logprobs": ParamRange(True, lo=0),
    "prompt_logprobs": ParamRange(True, lo=0),
}
# Fields that may also be None ("not set").
_OPTIONAL = frozenset({"seed", "max_tokens", "logprobs", "prompt_logprobs"})


def check_param(name: str, value: Any, label: str | None = None) -> str | None:
    """The error message for a value of field `name` outside its type or range (None: fine).
    `label`: the name to show, when the caller's field maps onto this one (top_logprobs)."""
    spec = PARAM_RANGES[name]
    if spec.accepts(value):
        return None
    return f"{label or name} must be {spec.describe()}, got {value!r}"


@dataclass
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's names): exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object=True`), a regular
    expression, a list of literal choices, or an EBNF grammar (GBNF, as xgrammar reads it). The
    engine compiles it once per distinct constraint and masks every step's logits with it."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (object or text)")
        if isinstance(self.json, bool):
            raise ValueError("structured_outputs.json must be a JSON schema")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be true or false")

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: its kind and its canonical text."""
        import json as _json

        if self.json is not None:
            text = (
                self.json if isinstance(self.json, str) else _json.dumps(self.json, sort_keys=True)
            )
            return ("json", text)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", _json.dumps(self.choice))
        assert self.grammar is not None
        return ("grammar", self.grammar)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's knob for its slow-tokenizer path. Here special tokens are decoded as the tokenizer
    # decodes them, with no spaces put around them (what transformers 5's tokenizers, and vLLM
    # with a fast tokenizer, do whatever this says), so True is refused rather than ignored.
    spaces_between_special_tokens: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine, not the user: token ids that end generation besides stop_token_ids.
    _eos_token_ids: set[int] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            # JSON clients send token ids as strings; normalise once here.
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                ) from e
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}")

        for name in PARAM_RANGES:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            msg = check_param(name, value)
            if msg is not None:
                raise ValueError(msg)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            fail("logprobs", "must be an integer >= 0")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0
        ):
            fail("prompt_logprobs", "must be an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                fail("allowed_token_ids", "must not be empty")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                fail("allowed_token_ids", "must be non-negative integers")
        if self.logit_bias is not None and any(
            not -100.0 <= b <= 100.0 for b in self.logit_bias.values()
        ):
            fail("logit_bias", "values must be in [-100, 100]")
        if self.stop and not self.detokenize:
            fail("stop", "needs detokenize=True (stop strings are matched on the text)")
        if self.spaces_between_special_tokens:
            fail(
                "spaces_between_special_tokens",
                "is not supported: special tokens are decoded without spaces around them; "
                "leave it False",
            )
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            fail("structured_outputs", "must be a StructuredOutputsParams")
        if not isinstance(self.output_kind, RequestOutputKind):
            fail("output_kind", "must be a RequestOutputKind")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def verify_vocab(self, vocab_size: int) -> None:
        """Token ids the user named must exist in the model's vocabulary."""
        for name, ids in (
            ("logit_bias", list(self.logit_bias or {})),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside [0, {vocab_size}): {bad[:5]}")

    def clone(self) -> SamplingParams:
        """An independent copy. Every field is immutable but these containers; copying just them
        is ~20x cheaper than deepcopy, which every request pays (twice) on the event loop."""
        import copy

        new = copy.copy(self)
        for name in ("stop", "stop_token_ids", "allowed_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(new, name, list(value))
        if self.logit_bias is not None:
            new.logit_bias = dict(self.logit_bias)
        new._eos_token_ids = set(self._eos_token_ids)
        return new


def default_sampling_params(defaults: dict[str, Any]) -> SamplingParams:
    """SamplingParams() with a model's generation_config.json defaults (field -> value) over
    its own, as vLLM's `--generation-config auto` (a request that brings its own params wins)."""
    try:
        return SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"generation_config.json has a bad sampling default: {e}") from e
