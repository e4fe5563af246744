"""Constrained decoding with xgrammar: compiled grammars, per-sequence matchers, batch bitmasks.

A request's `SamplingParams.structured_outputs` is compiled once per distinct constraint (an LRU
of compiled grammars beside xgrammar's own cache) when the request is added; each of its sequences
gets a `GrammarMatcher`. Before a step samples, the matchers of its constrained rows fill one
int32 bitmask (a bit per token, the model's vocabulary padded to 32) on the host; the sampler
applies it to those rows in one batched pass. The matchers advance, in one call, when a step's
sampled tokens reach the host, and a matcher that has accepted a stop token (or refuses a token)
ends its sequence with "stop". With async scheduling the next step's fill then runs on a worker
thread (xgrammar's calls release the GIL) while the engine thread does the rest of the step's
per-token work. Rows without a constraint are never touched, and a step without constrained rows
does none of this.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from asyncllm import envs
from asyncllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Each fill thread gets at least this many rows: a row inside a JSON string takes 5-13 us, and
# handing xgrammar's workers fewer costs more than it saves.
_ROWS_PER_THREAD = 8
# Compiling a JSON schema against a 50k-token vocabulary takes tens to hundreds of milliseconds;
# bots send the same few schemas over and over.
_CACHE_SIZE = 256


# GrammarBackend.accept's outcome per matcher
ACCEPTED, TERMINATED, REJECTED = 0, 1, 2


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass
class StepBitmask:
    """The host-filled mask of one step: each row in `indices` of the logits keeps the tokens
    whose bit is set in the same row of `mask` (other rows of `mask` are unused)."""

    mask: torch.Tensor  # int32 [rows of the step, bitmask_width(vocab)], on the host
    indices: list[int]  # distinct rows, increasing
    # pinned int32 copy of `indices` (GPU engines only), for an async copy without a host sync
    pinned_indices: torch.Tensor | None = None
    # whether `indices` is every row of the step; None: apply_bitmask works it out. The fill
    # knows it for free (distinct increasing rows, as many as the step has).
    all_rows: bool | None = None


def fill_threads(num_rows: int) -> int:
    """Threads for a fill of `num_rows` matchers: half the process's cores, at most 8, at least
    8 rows each (see envs.grammar_threads)."""
    forced = envs.grammar_threads()
    if forced is not None:
        return forced
    # H200 host (16 cores), 64 rows inside a JSON string: 1 thread 0.83 ms, 2: 0.51, 4: 0.43,
    # 8: 0.46, 16: 0.82; 256 rows: 3.17 / 1.67 / 1.11 / 0.97 / 1.45 (fill_threads_ms).
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2, num_rows // _ROWS_PER_THREAD))


class FillThreadChooser:
    """Chooses, fill by fill, between one thread and fill_threads()' count, by measured time.

    A row inside a JSON string takes 5-13 us to fill and gains from xgrammar's threads; a row in
    the schema's structure takes well under 1 us, and handing it to threads costs more than the
    fill (the `items` schema read 0.96 of unconstrained with one thread, 0.86 with eight, on the
    H200). Which one a step has depends on where its rows are in their grammars, so the choice
    is measured: each count's time per row is kept as a moving average, the faster is used, and
    both are probed again every `probe_every` fills as the rows move through their grammars."""

    def __init__(self, probe_every: int = 64, weight: float = 0.25) -> None:
        self.probe_every = probe_every
        self.weight = weight
        self.cost: dict[int, float] = {}  # threads -> seconds per row (moving average)
        self._fills = 0

    def pick(self, num_rows: int) -> int:
        many = fill_threads(num_rows)
        if many == 1 or envs.grammar_threads() is not None:
            return many
        phase = self._fills % self.probe_every
        self._fills += 1
        if phase < 2:  # the probe: one fill with each count
            return 1 if phase == 0 else many
        one, best = self.cost.get(1), self.cost.get(many)
        if one is None or best is None:
            return many
        return 1 if one < best else many

    def record(self, threads: int, num_rows: int, seconds: float) -> None:
        per_row = seconds / max(1, num_rows)
        old = self.cost.get(threads)
        self.cost[threads] = per_row if old is None else old + self.weight * (per_row - old)


class _PinnedRing:
    """Two pinned host buffers used in turn, grown on demand.

    A GPU step's mask is copied to the device asynchronously, so its host buffer must not be
    refilled until that copy has run. The engine resolves step s (waiting on an event recorded
    after step s's sampling, hence after its copy) before it fills the mask of step s+2, so
    alternating between two buffers is enough and nothing waits."""

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def take(self, rows: int, cols: int) -> torch.Tensor:
        self._turn ^= 1
        buf = self._bufs[self._turn]
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = torch.empty(max(rows, 64), cols, dtype=torch.int32, pin_memory=True)
            self._bufs[self._turn] = buf
        return buf[:rows]


# While a fill runs on the worker thread, the GIL changes hands after this long instead of
# CPython's 5 ms: the worker needs the GIL for a few microseconds to start the fill and to return
# from it, and with 5 ms it would wait out the whole Python work it is meant to overlap.
_FILL_SWITCH_INTERVAL_S = 5e-5


class PendingFill:
    """A step's bitmask being filled on the backend's worker thread; `result()` waits for it."""

    def __init__(self, call: Callable[[], Any], value: StepBitmask, saved_interval: float) -> None:
        # the xgrammar call alone: any other work on the worker waits for the GIL
        self._call: Callable[[], Any] | None = call
        self._value = value
        self._saved_interval = saved_interval
        self._done = threading.Lock()
        self._done.acquire()
        self._error: BaseException | None = None
        self._joined = False

    def _run(self) -> None:  # on the worker thread
        call, self._call = self._call, None
        assert call is not None
        try:
            call()
        except BaseException as e:  # handed to the engine's thread by result()
            self._error = e
        finally:
            del call  # before the release: no xgrammar object is freed on this thread
            self._done.release()

    def join(self) -> None:
        """Waits for the fill (its error, if any, stays for result())."""
        if not self._joined:
            self._done.acquire()  # releases the GIL while it waits
            self._joined = True
            sys.setswitchinterval(self._saved_interval)

    def result(self) -> StepBitmask:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


class _FillWorker:
    """One daemon thread that runs fills handed to it. xgrammar's calls release the GIL
    (tvm-ffi's default), so the engine thread's Python work runs meanwhile."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child has no such thread: it starts its own
        self._jobs: queue.SimpleQueue[PendingFill | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._loop, name="asyncllm-grammar-fill", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job._run()
            del job

    def submit(self, call: Callable[[], Any], value: StepBitmask) -> PendingFill:
        job = PendingFill(call, value, sys.getswitchinterval())
        sys.setswitchinterval(_FILL_SWITCH_INTERVAL_S)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        self._jobs.put(None)


class GrammarBackend:
    """The xgrammar objects of one tokenizer and model vocabulary."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        pinned: bool = False,
    ):
        """`pinned`: fill masks into pinned host memory (a GPU engine copies them asynchronously)."""
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        # The model's vocabulary may be larger than the tokenizer's (padded embeddings): the
        # extra ids are never allowed, and the bitmask covers every logit.
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._batches: dict[int, Any] = {}  # threads -> BatchGrammarMatcher
        self._masks = _PinnedRing() if pinned else None
        self._index_bufs = _PinnedRing() if pinned else None
        self._worker: _FillWorker | None = None  # started at the first fill_async
        self.threads = FillThreadChooser()
        # xgrammar's batch accept without its wrapper, which reads every item of the result;
        # None (per-matcher accepts) should a later xgrammar move it.
        core = getattr(getattr(xgr, "base", None), "_core", None)
        self._batch_accept = getattr(
            getattr(core, "BatchGrammarMatcher", None), "batch_accept_token", None
        )
        # A matcher terminates only by accepting one of these (GrammarMatcher's default,
        # terminate_without_stop_token=False), so accept() asks is_terminated() only then.
        self._stop_ids = frozenset(int(t) for t in self.info.stop_token_ids)
        self.num_compiled = 0  # compilations done (cache misses), for tests and stats

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec`; ValueError for a constraint that does not compile."""
        key = spec.key
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        try:
            compiled = self._compile(spec)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError for bad input
            raise ValueError(f"invalid structured_outputs {key[0]}: {e}") from None
        self.num_compiled += 1
        self._compiled[key] = compiled
        if len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        c = self.compiler
        if spec.json is not None:
            schema = spec.json if isinstance(spec.json, str) else _dumps(spec.json)
            grammar = self._xgr.Grammar.from_json_schema(
                schema, any_whitespace=False, strict_mode=True
            )
            return c.compile_grammar(_strict_string_chars(str(grammar)))
        if spec.json_object:
            return c.compile_builtin_json_grammar()
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar(_choice_ebnf(spec.choice))
        assert spec.grammar is not None
        return c.compile_grammar(spec.grammar)

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def fill(self, num_rows: int, matchers: list[Any], indices: list[int]) -> StepBitmask:
        """The bitmask of a step of `num_rows` rows: matcher j fills row indices[j] (distinct
        rows, increasing)."""
        bm, call = self._fill_job(num_rows, matchers, indices)
        call()
        return bm

    def fill_async(self, num_rows: int, matchers: list[Any], indices: list[int]) -> PendingFill:
        """fill() on the worker thread: the caller's Python work runs while xgrammar fills.
        The matchers must not be touched until result() has returned."""
        if self._worker is None or self._worker.pid != os.getpid():
            self._worker = _FillWorker()
            # An engine dropped without shutdown() (tests, notebooks) takes its thread along.
            weakref.finalize(self, self._worker.stop)
        bm, call = self._fill_job(num_rows, matchers, indices)
        return self._worker.submit(call, bm)

    def _fill_job(
        self, num_rows: int, matchers: list[Any], indices: list[int]
    ) -> tuple[StepBitmask, Callable[[], Any]]:
        """The step's mask (its buffer taken, its indices copied) and the xgrammar call that
        fills it. Everything but the call is done by the caller's thread: on the worker, each
        torch call that drops the GIL would wait up to a switch interval to get it back."""
        width = bitmask_width(self.vocab_size)
        if self._masks is None:
            mask = torch.empty(num_rows, width, dtype=torch.int32)
        else:
            mask = self._masks.take(num_rows, width)
        all_rows = len(indices) == num_rows
        if len(matchers) == 1:
            call = partial(matchers[0].fill_next_token_bitmask, mask, indices[0])
        else:
            # indices=None: rows 0..n-1, without handing xgrammar a list to convert
            threads = self.threads.pick(len(matchers))
            call = partial(
                self._timed_fill,
                self._batch(threads).batch_fill_next_token_bitmask,
                threads,
                matchers,
                mask,
                None if all_rows else indices,
            )
        pinned_idx = None
        if self._index_bufs is not None and not all_rows:
            pinned_idx = self._index_bufs.take(len(indices), 1)[:, 0]
            pinned_idx.numpy()[:] = indices
        return StepBitmask(mask, indices, pinned_idx, all_rows), call

    def _timed_fill(
        self, fill: Callable[..., Any], threads: int, matchers: list[Any], mask: Any, idx: Any
    ) -> None:
        t0 = time.perf_counter()
        fill(matchers, mask, idx)
        self.threads.record(threads, len(matchers), time.perf_counter() - t0)

    def accept(self, matchers: list[Any], tokens: list[int]) -> list[int]:
        """Each matcher accepts its token, in one call into xgrammar; per matcher: ACCEPTED,
        TERMINATED (it took a stop token: the grammar is complete) or REJECTED."""
        stop = self._stop_ids
        raw = self._batch_accept
        if raw is None or len(matchers) == 1:
            ok = [m.accept_token(t) for m, t in zip(matchers, tokens, strict=True)]
        else:
            res = raw([m._handle for m in matchers], tokens, False)
            # Reading the result's items costs ~0.6 us each; `0 in` is one C call, and a
            # refused token (never, under the mask) is the only reason to read them.
            if 0 not in res:
                return [
                    TERMINATED if t in stop and m.is_terminated() else ACCEPTED
                    for m, t in zip(matchers, tokens, strict=True)
                ]
            ok = [bool(x) for x in res]
        return [
            (TERMINATED if t in stop and m.is_terminated() else ACCEPTED) if a else REJECTED
            for m, t, a in zip(matchers, tokens, ok, strict=True)
        ]

    def close(self) -> None:
        """Stops the fill worker, if one was started (idempotent)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _batch(self, threads: int) -> Any:
        b = self._batches.get(threads)
        if b is None:
            b = self._batches[threads] = self._xgr.BatchGrammarMatcher(threads)
        return b


def apply_bitmask(logits: torch.Tensor, bm: StepBitmask) -> None:
    """Masked-out tokens of the bitmask's rows -> -inf, in place, in one batched pass. On a GPU
    the mask and the row indices travel by async copies from pinned memory (xgrammar's Triton
    kernel then reads them): no host sync. On the CPU, rows that allow few tokens take a sparse
    path (see _apply_sparse_rows_cpu)."""
    import xgrammar as xgr

    mask = bm.mask
    indices: list[int] | torch.Tensor | None = bm.indices
    all_rows = bm.all_rows
    if all_rows is None:
        all_rows = bm.indices == list(range(logits.shape[0]))
    if all_rows:
        indices = None
    if logits.device.type == "cuda":
        if not mask.is_pinned():
            mask = mask.pin_memory()
        mask = mask.to(logits.device, non_blocking=True)
        if indices is not None:
            host = bm.pinned_indices
            if host is None:
                host = torch.tensor(bm.indices, dtype=torch.int32).pin_memory()
            indices = host.to(logits.device, non_blocking=True)
    elif logits.device.type == "cpu":
        indices = _apply_sparse_rows_cpu(logits, mask, bm.indices)
        if not indices:
            return
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[1], indices=indices)


def _apply_sparse_rows_cpu(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> list[int]:
    """Applies the mask to the rows of `rows` where fewer than half the mask's words allow any
    token, and returns the other rows, for xgrammar's kernel.

    xgrammar's CPU kernel writes -inf token by token: ~0.1-0.5 ms a row of a 49k vocabulary at a
    structural position (a few tokens allowed), against ~0.005 ms when almost everything is
    allowed (inside a string). For a sparse row it is cheaper to keep the few allowed logits,
    fill the whole row with -inf (a memset) and put them back. In numpy, which runs on the
    calling thread: torch's intra-op pool turned these small ops into 60-150 ms on a loaded
    2-core machine. Only float32 logits (numpy has no bfloat16); others go to the kernel."""
    import numpy as np

    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        return rows
    r_all = np.asarray(rows, dtype=np.int64)
    sub = mask.numpy()[r_all]
    nz = sub != 0
    sparse = nz.sum(1) * 2 < sub.shape[1]
    if not sparse.any():
        return rows
    srows = r_all[sparse]
    r, w = np.nonzero(nz[sparse])
    bits = np.unpackbits(sub[sparse][r, w].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    k, j = np.nonzero(bits)
    row, tok = srows[r[k]], w[k] * 32 + j
    inside = tok < logits.shape[1]  # the last word's padding bits
    row, tok = row[inside], tok[inside]
    # Writes through numpy touch the engine's inference tensors as xgrammar's kernel does.
    lg = logits.detach().numpy()
    kept = lg[row, tok]
    lg[srows] = -np.inf
    lg[row, tok] = kept
    return r_all[~sparse].tolist()


# xgrammar (0.2.9) writes the characters of a string with minLength/maxLength as the class
# "anything but quote, backslash, CR, LF", which lets raw control characters (U+0000-U+001F) in:
# a byte-level model then emits e.g. 0x06 inside a string and the answer is not JSON. Its
# unbounded strings exclude them; do the same for the bounded ones.
_LOOSE_STRING_CHARS = r"[^\"\\\r\n]"
_STRICT_STRING_CHARS = r"[^\0-\x1f\"\\]"


def _strict_string_chars(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_STRING_CHARS, _STRICT_STRING_CHARS)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj)


def _choice_ebnf(choices: list[str]) -> str:
    import json

    # JSON string literals are valid EBNF string literals (same escapes).
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)
