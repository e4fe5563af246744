"""Which engine of a data-parallel group gets a request: the least loaded, unless one holds the
request's prefix in its KV cache and is not much busier (prefix-cache aware, where it is cheap).

The router remembers, for the chained hashes of recent prompts' leading blocks (the block
manager's idea: a block's hash covers every token before it), which engine it sent them to. A
new turn of a conversation starts with the previous turn's prompt, so it matches that engine's
blocks and goes there; a prompt that only shares a system prompt with others matches a short
prefix and goes wherever the load is lowest within `slack`. Memory is bounded (LRU over block
hashes); the cost is one hash per block of the first `max_blocks` blocks, on the event loop.
Plain data, no engines, no torch: the data-parallel client owns the loads and asks.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

TEXT_CHUNK = 64  # characters per "block" of a text prompt (the gateway sends token ids)


def prefix_keys(prompt: Any, block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's full leading blocks (token ids, or text chunks)."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    if isinstance(prompt, str):
        size = TEXT_CHUNK
    elif isinstance(prompt, (list, tuple)):
        size = block_size
    else:
        return []
    keys, h = [], 0
    for start in range(0, min(len(prompt) // size, max_blocks) * size, size):
        h = hash((h, tuple(prompt[start : start + size])))
        keys.append(h)
    return keys


class PrefixRouter:
    def __init__(
        self,
        num_engines: int,
        block_size: int = 16,
        max_blocks: int = 256,
        capacity: int = 1 << 16,
        slack: int = 4,
    ):
        self.num_engines = num_engines
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.capacity = capacity
        self.slack = (
            slack  # requests an engine may be busier than the least loaded and keep a prefix
        )
        self._owner: OrderedDict[int, int] = OrderedDict()  # block hash -> engine
        self._turn = itertools.count()

    def choose(self, prompt: Any, loads: Sequence[int], alive: Sequence[bool]) -> tuple[int, int]:
        """(engine, blocks of the prompt it is believed to hold). `loads`: requests in flight
        per engine. Raises LookupError when no engine is alive."""
        live = [i for i in range(self.num_engines) if alive[i]]
        if not live:
            raise LookupError("no engine is alive")
        keys = prefix_keys(prompt, self.block_size, self.max_blocks)
        holder, matched = -1, 0
        for k in keys:  # chained: the first miss ends the shared prefix
            e = self._owner.get(k)
            if e is None:
                break
            holder, matched = e, matched + 1
        low = min(loads[i] for i in live)
        # the least loaded, ties taken in turn (idle engines share the work)
        tied = [i for i in live if loads[i] == low]
        choice = tied[next(self._turn) % len(tied)]
        if matched and alive[holder] and loads[holder] <= low + self.slack:
            choice = holder
        else:
            matched = 0
        self._record(keys, choice)
        return choice, matched

    def _record(self, keys: list[int], engine: int) -> None:
        owner = self._owner
        for k in keys:
            owner[k] = engine
            owner.move_to_end(k)
        while len(owner) > self.capacity:
            owner.popitem(last=False)

    def forget_engine(self, engine: int) -> None:
        """An engine died: its cache is gone."""
        for k in [k for k, e in self._owner.items() if e == engine]:
            del self._owner[k]
