"""DataParallelEngine: N engine processes on one host behind one gateway, as one EngineClient.

Each engine is an AsyncLLMEngine whose loop runs in a child process of its own (one per GPU,
or per NUMA node on a CPU host: placement.py). Every request goes to one engine
(dp_router.py: the least loaded by requests in flight, or the one that holds the request's
prefix in its KV cache when it is not much busier), and its outputs come back unchanged: the
gateway above cannot tell one engine from N.

When an engine dies, its own streams end with its EngineDeadError, the death is logged and
shows in `engine_states()` (the per-engine metrics), and new requests go to the others; the
group as a whole is `errored` only when every engine is dead. A dead engine is not restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from asyncllm.config import EngineArgs
from asyncllm.engine.dp_router import PrefixRouter
from asyncllm.engine.engine_client import EngineClient, EngineStatsView, OutputIterator
from asyncllm.engine.placement import PlacedFactory, Placement, plan_placements
from asyncllm.outputs import RequestOutput
from asyncllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class GroupStats:
    """The group's EngineStatsView: the live engines' numbers, summed."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0


@dataclass
class EngineState:
    """One engine of the group, for metrics."""

    index: int
    alive: bool
    in_flight: int  # requests routed to it and not finished
    routed: int  # requests routed to it in all
    prefix_routed: int  # ... of which for a prefix it held
    stats: EngineStatsView | None  # its last stats (None once dead)


class DataParallelEngine:
    """`async with DataParallelEngine.from_engine_args(EngineArgs(...), 2) as engine:`."""

    def __init__(
        self,
        engines: Sequence[EngineClient],
        placements: Sequence[Placement] = (),
        block_size: int = 16,
    ):
        """`block_size`: the engines' KV block size, the router's unit of prefix."""
        if not engines:
            raise ValueError("a data-parallel group needs at least one engine")
        self.engines = list(engines)
        self.placements = list(placements)
        n = len(self.engines)
        self.router = PrefixRouter(n, block_size)
        self._in_flight = [0] * n
        self._routed = [0] * n
        self._prefix_routed = [0] * n
        self._owner: dict[str, int] = {}  # live request id -> engine
        self._reported_dead: set[int] = set()
        self._started = False

    @classmethod
    def from_engine_args(
        cls,
        args: EngineArgs,
        size: int,
        factory: Callable[[EngineArgs], Any] | None = None,
        placements: Sequence[Placement] | None = None,
    ) -> DataParallelEngine:
        """N AsyncLLMEngines, each in its own process at its placement, seeded seed + rank.
        `factory`: what builds each child's engine (default LLMEngine.from_engine_args)."""
        from asyncllm.engine.async_engine import AsyncLLMEngine

        if not isinstance(args, EngineArgs):
            raise ValueError(f"expected EngineArgs, got {type(args).__name__}")
        plan = list(placements) if placements is not None else plan_placements(size, args.device)
        if len(plan) != size:
            raise ValueError(f"{size} engines need {size} placements, got {len(plan)}")
        engines = [
            AsyncLLMEngine(
                engine_args=dataclasses.replace(args, engine_process=True, seed=args.seed + i),
                engine_factory=PlacedFactory(p, factory),
            )
            for i, p in enumerate(plan)
        ]
        return cls(engines, plan, args.block_size)

    # ---- what the gateway reads ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.engines)

    @property
    def tokenizer(self) -> Any:
        return self.engines[0].tokenizer

    @property
    def model_config(self) -> Any:
        return self.engines[0].model_config

    @property
    def vocab_size(self) -> int | None:
        return self.engines[0].vocab_size

    @property
    def errored(self) -> bool:
        return all(e.errored for e in self.engines)

    def alive(self) -> list[bool]:
        alive = [not e.errored for e in self.engines]
        for i, ok in enumerate(alive):
            if not ok and i not in self._reported_dead:
                self._reported_dead.add(i)
                self.router.forget_engine(i)
                logger.error(
                    "asyncllm: data-parallel engine %d of %d died; %d still serve",
                    i,
                    self.size,
                    sum(alive),
                )
        return alive

    def stats(self) -> GroupStats:
        if not self._started:
            raise RuntimeError("the engines are not loaded yet: call start() first")
        g = GroupStats()
        for e, ok in zip(self.engines, self.alive(), strict=True):
            if ok:
                s = e.stats()
                g.num_running += s.num_running
                g.num_waiting += s.num_waiting
                g.kv_blocks_total += s.kv_blocks_total
                g.kv_blocks_free += s.kv_blocks_free
        return g

    def engine_states(self) -> list[EngineState]:
        out = []
        for i, (e, ok) in enumerate(zip(self.engines, self.alive(), strict=True)):
            stats = e.stats() if ok and self._started else None
            out.append(
                EngineState(
                    i, ok, self._in_flight[i], self._routed[i], self._prefix_routed[i], stats
                )
            )
        return out

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> DataParallelEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Load every engine at once; if one fails, stop the others and raise its error."""
        if self._started:
            return
        for p in self.placements:
            logger.info("asyncllm: data parallel: %s", p.describe())
        errors: list[Exception] = []

        async def start_one(e: EngineClient) -> None:
            try:
                await e.start()
            except Exception as exc:  # the first one is raised once all have settled
                errors.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                for e in self.engines:
                    tg.start_soon(start_one, e)
        finally:
            if errors or not all(e.model_config is not None for e in self.engines):
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
        if errors:
            raise errors[0]
        self._started = True

    async def shutdown(self) -> None:
        async with anyio.create_task_group() as tg:
            for e in self.engines:
                tg.start_soon(e.shutdown)

    # ---- requests --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Callable[[RequestOutput], None] | None = None,
    ) -> OutputIterator:
        """On the engine the router picks; the same contract as one engine's."""
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use by a live request")
        try:
            i, matched = self.router.choose(prompt, self._in_flight, self.alive())
        except LookupError:
            from asyncllm.engine.async_engine import EngineDeadError

            raise EngineDeadError("every data-parallel engine has died; no new requests") from None
        inner = self.engines[i].generate(prompt, sampling_params, request_id, priority, sink)
        self._owner[request_id] = i
        self._in_flight[i] += 1
        self._routed[i] += 1
        self._prefix_routed[i] += matched > 0
        return _Routed(self, request_id, i, inner)

    async def abort(self, request_id: str) -> None:
        i = self._owner.get(request_id)
        # Its iterator may have ended (and left the books) while its engine still lets go of it:
        # ask every engine then (an unknown id is a no-op for each).
        for e in [self.engines[i]] if i is not None else self.engines:
            await e.abort(request_id)

    def _release(self, request_id: str, i: int) -> None:
        if self._owner.get(request_id) == i:
            del self._owner[request_id]
            self._in_flight[i] -= 1


class _Routed(AsyncIterator[RequestOutput]):
    """One engine's output iterator, counted in its engine's load until it ends."""

    def __init__(self, group: DataParallelEngine, request_id: str, index: int, inner: Any):
        self._group = group
        self.request_id = request_id
        self.index = index
        self._inner = inner
        self._done = False

    def __aiter__(self) -> _Routed:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return await self._inner.__anext__()
        except BaseException:
            self._end()
            raise

    async def aclose(self) -> None:
        self._end()
        await self._inner.aclose()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._group._release(self.request_id, self.index)

    def __del__(self) -> None:
        # `break` drops the iterator: the inner one aborts the request on its own drop.
        try:
            self._end()
        except Exception:
            pass
