"""CPU cost per token of the incremental detokenizer with and without its per-token shortcut
(ASYNCLLM_DETOK_FAST), alternated: 64 streams of 200 tokens, a stop string set (so the matcher
runs), this thread's CPU time. `wordlevel`: the peer benchmark's tokenizer, random ids;
`bytelevel`: the tests' trained byte-level BPE on real text (needs a checkout's tests/).

    python -m ops.bench.detok_cost      (prints one JSON line)"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.sampling_params import SamplingParams


def _streams(name: str, tok) -> list[list[int]]:
    rng = random.Random(0)
    if name == "wordlevel":
        return [[rng.randrange(300, 151_000) for _ in range(200)] for _ in range(64)]
    from tests.tiny_models import CORPUS

    ids = tok.encode(" ".join(CORPUS[:8]))
    return [ids[i % 5 :][:200] for i in range(64)]


def us_per_token(tok, streams: list[list[int]], fast: bool) -> float:
    os.environ["ASYNCLLM_DETOK_FAST"] = "1" if fast else "0"
    ds = [IncrementalDetokenizer(tok, [5, 6, 7], SamplingParams(stop=["zzz"])) for _ in streams]
    t = time.thread_time()
    for j in range(max(len(s) for s in streams)):
        for d, s in zip(ds, streams, strict=True):
            if j < len(s):
                d.add_tokens([s[j]])
    return (time.thread_time() - t) / sum(len(s) for s in streams) * 1e6


def main() -> None:
    from transformers import AutoTokenizer

    from asyncllm.bench.model import _tokenizer
    from tests.tiny_models import build_tokenizer

    out: dict = {"benchmark": "detok_cost", "unit": "us/token (CPU)"}
    with tempfile.TemporaryDirectory() as d:
        _tokenizer(Path(d) / "w", 151_936, 0)
        toks = {
            "wordlevel": AutoTokenizer.from_pretrained(Path(d) / "w"),
            "bytelevel": build_tokenizer(Path(d) / "b"),
        }
        for name, tok in toks.items():
            streams = _streams(name, tok)
            runs = {"slow": [], "fast": []}
            for fast in (False, True, False, True, False, True):
                runs["fast" if fast else "slow"].append(us_per_token(tok, streams, fast))
            out[name] = {k: round(statistics.median(v), 2) for k, v in runs.items()}
            out[name]["ratio"] = round(out[name]["fast"] / out[name]["slow"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
