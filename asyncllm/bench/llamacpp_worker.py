"""Runs inside the llama.cpp venv (ops/bench/setup_llamacpp.sh; llama-cpp-python, no asyncllm, no
torch): times llama.cpp on the GGUF file and the token ids the cpu benchmark hands it, and writes the
figures as JSON. Its low-level API (llama_batch / llama_decode), so the prompts go in as token ids,
exactly the ids every other engine gets, and the loop is the one llama.cpp's own server runs for
parallel slots: one context with n_seq_max sequences sharing a unified KV cache, every running
sequence's next token in one llama_decode per step.

python llamacpp_worker.py JOB_JSON OUT_JSON

JOB_JSON as asyncllm/bench/cpu_worker.py's (mode batch|single, prompts, warmup, max_tokens,
threads, logprob_prompts) plus gguf (the file) and texts (the prompts' text, to check that llama.cpp's
own tokenizer gives the same ids). Greedy = argmax of the logits (numpy over the rows llama.cpp
returns, the work its greedy sampler does); EOS is not checked, so every sequence runs to
max_tokens (EOS ignored)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import llama_cpp as L
import numpy as np


class Runner:
    def __init__(self, gguf: str, threads: int, n_seq: int, n_ctx: int, n_batch: int = 2048):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        # one KV pool for all sequences (as llama-server's parallel slots with a unified cache):
        # without it n_ctx is split evenly and a sequence is capped at n_ctx / n_seq_max
        cp.kv_unified = True
        self.params = {
            "n_ctx": cp.n_ctx,
            "n_batch": cp.n_batch,
            "n_ubatch": cp.n_ubatch,
            "n_seq_max": cp.n_seq_max,
            "n_threads": cp.n_threads,
            "n_threads_batch": cp.n_threads_batch,
            "flash_attn_type": cp.flash_attn_type,  # -1: auto (llama.cpp's default)
            "type_k": cp.type_k,
            "type_v": cp.type_v,
            "kv_unified": cp.kv_unified,
        }
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create its context")
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no KV slot for the batch)")

    def _rows(self, n: int) -> np.ndarray:
        # the logits of the batch's output tokens, in batch order, n x n_vocab
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def generate(
        self, prompts: list[list[int]], max_tokens: int, logprobs: bool = False
    ) -> tuple[list[list[int]], list[list[float]]]:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]

        def take(rows: np.ndarray, seqs: list[int]) -> None:
            ids = rows.argmax(axis=1)
            if logprobs:  # the chosen (max) token's logprob: max - logsumexp
                m = rows.max(axis=1, keepdims=True)
                lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
                for s, v in zip(seqs, (m[:, 0] - lse).tolist(), strict=True):
                    lps[s].append(v)
            for s, t in zip(seqs, ids.tolist(), strict=True):
                out[s].append(int(t))

        # prefill: the prompts' tokens in chunks of n_batch, the last token of each prompt asks
        # for logits (its first output token)
        pending: list[tuple[int, int, int, bool]] = []
        for s, p in enumerate(prompts):
            for j, t in enumerate(p):
                pending.append((t, j, s, j == len(p) - 1))
                if len(pending) == self.n_batch:
                    self._decode(pending)
                    outs = [x[2] for x in pending if x[3]]
                    take(self._rows(len(outs)), outs)
                    pending = []
        if pending:
            self._decode(pending)
            outs = [x[2] for x in pending if x[3]]
            take(self._rows(len(outs)), outs)
        seqs = list(range(n))
        for step in range(1, max_tokens):
            self._decode([(out[s][-1], len(prompts[s]) + step - 1, s, True) for s in seqs])
            take(self._rows(n), seqs)
        return out, lps

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        # the benchmark's ids: the chat template's text encoded without added specials, its
        # special tokens (<|im_start|>...) parsed as such
        k = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        if k < 0:
            raise RuntimeError("llama_tokenize: buffer too small")
        return list(buf[:k])


def _ctx_size(tokens: int) -> int:
    return (tokens + 255) // 256 * 256


def main() -> int:
    job_path, out_path = sys.argv[1:3]
    job: dict[str, Any] = json.load(open(job_path))
    prompts, n_max, mode = job["prompts"], job["max_tokens"], job["mode"]
    if mode == "batch":
        n_seq, n_ctx = len(prompts), _ctx_size(sum(len(p) + n_max for p in prompts))
    else:
        n_seq, n_ctx = 1, _ctx_size(max(len(p) for p in prompts) + n_max)
    n_ctx = max(n_ctx, _ctx_size(len(job["warmup"]) + 4))
    t0 = time.perf_counter()
    r = Runner(job["gguf"], job["threads"], n_seq, n_ctx)
    start = time.perf_counter() - t0
    r.generate([job["warmup"]], 4)
    res: dict[str, Any] = {"engine_start_s": start, "context_params": r.params}
    if mode == "batch":
        t0 = time.perf_counter()
        ids, _ = r.generate(prompts, n_max)
        elapsed = time.perf_counter() - t0
        n = sum(len(x) for x in ids)
        res.update(elapsed_s=elapsed, output_tokens=n, output_tok_per_s=n / elapsed)
    else:
        ids, per_req = [], []
        for p in prompts:
            t0 = time.perf_counter()
            (one,), _ = r.generate([p], n_max)
            per_req.append((time.perf_counter() - t0) * 1e3 / len(one))
            ids.append(one)
        res.update(
            ms_per_token=statistics.median(per_req),
            per_request_ms_per_token=per_req,
            output_tokens=sum(len(x) for x in ids),
        )
    res["token_ids"] = ids
    k = job.get("logprob_prompts", 0)
    if k and mode == "batch":
        lids, lps = r.generate(prompts[:k], n_max, logprobs=True)
        res["logprob_pass"] = {"token_ids": lids, "logprobs": lps}
    texts = job.get("texts")
    if texts:
        mine = [r.tokenize(t) for t in texts]
        res["tokenizer_check"] = {
            "prompts": len(texts),
            "same_ids": sum(a == b for a, b in zip(mine, prompts, strict=True)),
            "same_count": sum(len(a) == len(b) for a, b in zip(mine, prompts, strict=True)),
        }
    res["llama_cpp_python"] = L.__version__
    res["system_info"] = L.llama_print_system_info().decode(errors="replace")
    json.dump(res, open(out_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
