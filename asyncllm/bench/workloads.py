"""The fixed workloads of DESIGN.md section 6, drawn from seeded generators so every run and every
baseline sees the same requests."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def throughput_workload(
    n: int = 256, lo: int = 100, hi: int = 1024, vocab: int = 151936, seed: int = 0
) -> list[Request]:
    """n requests, prompt and output lengths uniform in [lo, hi], random token ids."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p, o = rng.randint(lo, hi), rng.randint(lo, hi)
        # keep clear of the special ids at the top of Qwen's vocabulary
        reqs.append(Request([rng.randrange(0, vocab - 300) for _ in range(p)], o))
    return reqs


def latency_workload(prompt_len: int = 256, out_len: int = 256, vocab: int = 151936, seed: int = 1):
    rng = random.Random(seed)
    return Request([rng.randrange(0, vocab - 300) for _ in range(prompt_len)], out_len)
