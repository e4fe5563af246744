"""Incremental detokenization with stop strings.

Each step decodes only a small window of recent tokens (the prefix/read offset technique): the
text of `ids[prefix:read]` was already emitted; the text of `ids[prefix:]` minus it is new. A window
whose text ends in U+FFFD stops at an incomplete multi-byte character (byte-level BPE splits one
across tokens), so nothing is emitted until a later token completes it.

Stop strings are matched on the decoded text, across token boundaries. Text that could be the
start of a stop string is held back from `output_text` until it is either completed (then cut)
or ruled out (then released), so `output_text` only ever grows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from asyncllm import envs
from asyncllm.sampling_params import SamplingParams

# Prompt tokens kept as left context: tokenizers that drop a leading space when a token is decoded
# alone (SentencePiece) then decode the first generated token as they would in the full text.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self._raw_decode = fast_decode(tokenizer)
        # A token's own text, where this tokenizer decodes by concatenation (None: it does not,
        # or ASYNCLLM_DETOK_FAST=0): see concat_pieces.
        self._pieces: tuple[list[str], str] | None = None
        if envs.detok_fast():
            self._pieces = concat_pieces(tokenizer, self._raw_decode, params.skip_special_tokens)
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self._max_stop = max((len(s) for s in self.stop), default=0)
        # Per stop string: its KMP failure table and how much of it the text ends with.
        self._fail = [_failure_table(s) for s in self.stop]
        self._matched = [0] * len(self.stop)
        self._fed = 0  # _text[:_fed] has been fed to the matchers

        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if ctx and self._decode(ctx).endswith(_REPLACEMENT):
            # The prompt ends inside a character: diffing against its text would misalign.
            ctx = []
        self._ids: list[int] = ctx  # a window: left context + output tokens not yet settled
        self._prefix = 0  # ids[_prefix:_read] is context whose text was already accounted
        self._read = len(ctx)
        self._prefix_text: str | None = None  # cached decode of ids[_prefix:_read]
        self._text = ""  # all decoded output text so far (complete characters only)
        self._searched = 0  # _text[:_searched] has been searched for stop strings
        self.output_text = ""  # APPEND-ONLY: text safe to show
        # vLLM: stop strings count only once more than min_tokens tokens are out; text before
        # that is neither matched nor held back.
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self.stop_reason: str | None = None
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self._raw_decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self) -> str:
        """Text of the tokens after the read offset, or "" while it ends mid-character."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        new = full[len(self._prefix_text) :]
        # The emitted tokens become the next window's context; older ones are no longer needed.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = None
        return new

    def _fast_new(self, tok: int) -> str | None:
        """What _decode_new would return for `tok`, without decoding, when nothing is pending
        (the window is all context) and `tok`'s own text is complete and non-empty: the window's
        text then ends with the context's text, the separator (when that text is not empty) and
        the token's. Leaves the state _decode_new would. None: take the decoding path."""
        pieces, sep = self._pieces  # type: ignore[misc]
        piece = pieces[tok] if 0 <= tok < len(pieces) else ""
        if not piece or _REPLACEMENT in piece:
            return None
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        new = (sep if self._prefix_text else "") + piece
        self._ids = [tok]
        self._prefix, self._read = 0, 1
        self._prefix_text = piece
        return new

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Decode new tokens; return the stop string matched, if any (then generation is over)."""
        if self.finished:
            return None
        new = None
        if self._pieces is not None and len(token_ids) == 1 and self._read == len(self._ids):
            new = self._fast_new(token_ids[0])
        if new is None:
            self._ids.extend(token_ids)
            new = self._decode_new()
        self._num_tokens += len(token_ids)
        if not new:
            return None
        self._text += new
        if not self.stop or self._num_tokens <= self._min_tokens:
            self.output_text = self._text
            self._searched = len(self._text)
            return None
        return self._check_stop()

    def _check_stop(self) -> str | None:
        # A match can start up to max_stop - 1 characters before the new text.
        start = max(0, self._searched - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self._text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        self._searched = len(self._text)
        if best is not None:
            pos, s = best
            end = pos + len(s) if self.include_stop else pos
            # Held-back text guarantees end >= len(output_text); max() keeps it append-only anyway.
            self.output_text = self._text[: max(end, len(self.output_text))]
            self.stop_reason = s
            self.finished = True
            return s
        if self.include_stop:
            # The stop string would be shown anyway, so a possible prefix of it need not wait.
            self.output_text = self._text
        else:
            self.output_text = self._text[: len(self._text) - self._held_back()]
        return None

    def _held_back(self) -> int:
        """Length of the longest suffix of the unreleased text that starts some stop string.

        Each stop string has a KMP matcher fed only the new text, so a token costs time in
        its own characters, not in the held-back text (trying every prefix length with
        endswith was quadratic in it). The matched length can reach into released text (text
        shown while min_tokens held stop strings off): then the matcher's own chain gives the
        longest shorter candidate that fits in the unreleased text."""
        text = self._text
        new = text[self._fed :]
        self._fed = len(text)
        pending = len(text) - len(self.output_text)
        hold = 0
        for i, s in enumerate(self.stop):
            k, fail, n = self._matched[i], self._fail[i], len(s)
            for ch in new:
                while k and (k == n or s[k] != ch):
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
            self._matched[i] = k
            h = fail[n - 1] if k == n else k  # a whole match does not count as a start
            while h > pending:
                h = fail[h - 1]
            hold = max(hold, h)
        return hold

    def finish(self) -> None:
        """Generation ended for another reason (EOS, length, abort): release what was held back,
        including an incomplete trailing character (shown as U+FFFD, as a full decode would)."""
        if self.finished:
            return
        self.finished = True
        if self._read < len(self._ids):
            if self._prefix_text is None:
                self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            full = self._decode(self._ids[self._prefix :])
            self._text += full[len(self._prefix_text) :]
        self.output_text = self._text


def _failure_table(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


_token_cache: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()
_decoders: weakref.WeakKeyDictionary[Any, Callable[..., str]] = weakref.WeakKeyDictionary()


def fast_decode(tokenizer: Any) -> Callable[..., str]:
    """`decode(ids, skip_special_tokens=...)` for this tokenizer, by the Rust backend directly
    where that gives the same text.

    transformers' `decode` wraps the backend's in Python (argument normalisation, optional
    clean-up) that cost more than the decode itself: the detokenizer decodes twice per token,
    and on a GPU the engine's per-token host work is the limit at high batch sizes. The backend
    is used only where transformers would not clean up spaces, and after a check that both
    agree on a sample of ids; anything else (slow tokenizers, other wrappers) keeps `decode`."""
    try:
        cached = _decoders.get(tokenizer)
    except TypeError:  # not weakly referenceable: no cache, no fast path
        return tokenizer.decode
    if cached is not None:
        return cached
    fn: Callable[..., str] = tokenizer.decode
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and callable(getattr(backend, "decode", None))
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and _agrees(tokenizer, backend)
    ):
        fn = backend.decode
    _decoders[tokenizer] = fn
    return fn


def _agrees(tokenizer: Any, backend: Any) -> bool:
    try:
        n = len(tokenizer)
        step = max(1, n // 97)
        samples = [list(range(i, min(n, i + 7))) for i in range(0, n, step)][:120]
        samples.append(list(getattr(tokenizer, "all_special_ids", []) or [])[:8] + [0, 1])
        for ids in samples:
            for skip in (False, True):
                want = tokenizer.decode(ids, skip_special_tokens=skip)
                if backend.decode(ids, skip_special_tokens=skip) != want:
                    return False
    except Exception:
        return False
    return True


_pieces_cache: weakref.WeakKeyDictionary[Any, dict[bool, tuple[list[str], str] | None]] = (
    weakref.WeakKeyDictionary()
)


def concat_pieces(
    tokenizer: Any, decode: Callable[..., str], skip_special_tokens: bool
) -> tuple[list[str], str] | None:
    """(text of each token id alone, separator) when this tokenizer's decode of a window is the
    window's context text, then the separator if that text is not empty, then the new token's
    own text, for every token whose own text is complete (no U+FFFD): byte-level BPE (separator
    "", Qwen's and GPT-2's), word-level without a decoder ("", joined by " "). Checked on a
    sample of windows (context of 1-3 ids, special ids included) against the real decode; None
    when any disagrees (SentencePiece drops a token's leading space when it stands alone) or the
    tokenizer cannot be sampled. Built once per tokenizer and setting."""
    try:
        per = _pieces_cache.setdefault(tokenizer, {})
    except TypeError:
        return None
    if skip_special_tokens in per:
        return per[skip_special_tokens]
    result = None
    try:
        n = len(tokenizer)
        backend = getattr(tokenizer, "_tokenizer", None)
        ids = [[i] for i in range(n)]
        if backend is not None and getattr(decode, "__self__", None) is backend:
            pieces = backend.decode_batch(ids, skip_special_tokens=skip_special_tokens)
        else:
            pieces = [decode(i, skip_special_tokens=skip_special_tokens) for i in ids]
        result = _check_concat(decode, pieces, skip_special_tokens, tokenizer)
    except Exception:
        result = None
    per[skip_special_tokens] = result
    return result


def _check_concat(
    decode: Callable[..., str], pieces: list[str], skip: bool, tokenizer: Any
) -> tuple[list[str], str] | None:
    import random

    n = len(pieces)
    rng = random.Random(0)
    specials = list(getattr(tokenizer, "all_special_ids", []) or [])[:8]
    pool = list(range(min(n, 512))) + [rng.randrange(n) for _ in range(512)] + specials
    sep: str | None = None
    checked = 0
    for trial in range(600):
        ctx = [rng.choice(pool) for _ in range(1 + trial % 3)]
        tok = rng.choice(pool)
        piece = pieces[tok]
        if not piece or _REPLACEMENT in piece:
            continue
        ctx_text = decode(ctx, skip_special_tokens=skip)
        if ctx_text.endswith(_REPLACEMENT):
            continue  # the detokenizer never keeps such a context
        full = decode(ctx + [tok], skip_special_tokens=skip)
        if not ctx_text:
            if full != piece:
                return None
            continue
        if not (full.startswith(ctx_text) and full.endswith(piece)):
            return None
        gap = full[len(ctx_text) : len(full) - len(piece)]
        if sep is None:
            if gap not in ("", " "):
                return None
            sep = gap
        elif gap != sep:
            return None
        checked += 1
    if sep is None or checked < 100:
        return None
    return pieces, sep


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text, as vLLM's Logprob.decoded_token (special tokens included)."""
    try:
        cache = _token_cache.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    text = cache.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        cache[token_id] = text
    return text
