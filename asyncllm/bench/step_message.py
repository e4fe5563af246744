"""Host cost of the scheduler -> runner step message at a decode batch (CPU, no model):
writing it (StepWriter.write, inside Scheduler.schedule), applying it (ModelRunner.update_states),
building the inputs from the runner's state (ModelRunner.prepare, for scale), and pickling it
(what a tensor-parallel rank would receive). python -m asyncllm.bench.step_message [--batch 256]"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch

from asyncllm.config import SchedulerConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.model_runner import ModelRunner
from asyncllm.engine.scheduler import Scheduler
from asyncllm.engine.sequence import Request, Sequence
from asyncllm.sampling_params import SamplingParams


def _runner(block_size: int) -> ModelRunner:
    # Only the host-side input building is timed: no model, no KV cache.
    r = ModelRunner.__new__(ModelRunner)
    r.block_size, r.pin, r.device, r.states = block_size, False, torch.device("cpu"), {}
    r.graph_runner = None
    return r


def decode_scheduler(batch: int, prompt: int, block_size: int, steps: int) -> Scheduler:
    """A scheduler holding `batch` prompts of `prompt` tokens, room for `steps` decode steps:
    its first step is their prefill, the rest decode the whole batch."""
    per_seq = -(-(prompt + steps + 1) // block_size)
    bm = BlockManager(batch * per_seq, block_size, enable_prefix_caching=False)
    cfg = SchedulerConfig(batch, batch * prompt, prompt + steps + 8)
    sched = Scheduler(cfg, bm)
    for i in range(batch):
        toks = [(i * 31 + j) % 30000 for j in range(prompt)]
        req = Request(f"r{i}", None, toks, SamplingParams(), arrival_time=float(i))
        seq = Sequence(request=req, index=0, token_ids=list(toks), num_prompt_tokens=prompt)
        req.seqs.append(seq)
        sched.add(seq)
    return sched


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    sched = decode_scheduler(a.batch, a.prompt, a.block_size, a.steps)
    runner = _runner(a.block_size)
    write_s, apply_s, prep_s, pickle_s, sizes = [], [], [], [], []
    writer_write = sched.writer.write

    def timed_write(*args):
        t = time.perf_counter()
        msg = writer_write(*args)
        write_s.append(time.perf_counter() - t)
        return msg

    sched.writer.write = timed_write
    for step in range(a.steps + 1):
        out = sched.schedule()
        msg = out.step
        t0 = time.perf_counter()
        runner.update_states(msg)
        t1 = time.perf_counter()
        runner.prepare(msg)
        t2 = time.perf_counter()
        blob = pickle.dumps(msg)
        t3 = time.perf_counter()
        if step:  # the first is the prefill
            apply_s.append(t1 - t0)
            prep_s.append(t2 - t1)
            pickle_s.append(t3 - t2)
            sizes.append(len(blob))
        for item in out.scheduled:  # the engine's part: computed tokens, a sampled token
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.token_ids.append(7)
    write_s = write_s[1:]

    def us(xs: list[float]) -> str:
        # The minimum as well: on a shared machine the median carries other processes' time.
        return f"median {statistics.median(xs) * 1e6:7.1f} us, min {min(xs) * 1e6:7.1f} us"

    print(f"decode batch {a.batch}, context {a.prompt}+, block size {a.block_size}")
    print(f"  write the message (StepWriter.write)     {us(write_s)}")
    print(f"  apply it (ModelRunner.update_states)     {us(apply_s)}")
    print(f"  build inputs from state (prepare, CPU)   {us(prep_s)}")
    print(
        f"  pickle it                                {us(pickle_s)}, {statistics.median(sizes):.0f} bytes"
    )


if __name__ == "__main__":
    main()
