"""RequestOutputs from the engine's request state, per each request's output_kind (cumulative,
delta, or final only)."""

from __future__ import annotations

import time

from asyncllm.engine.sequence import Request
from asyncllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from asyncllm.sampling_params import RequestOutputKind


def collect_outputs(
    touched: dict[str, Request], requests: dict[str, Request]
) -> list[RequestOutput]:
    """The outputs of the requests a step touched; finished ones leave `requests`."""
    outputs = []
    for rid, req in touched.items():
        finished = req.finished
        if finished:
            req.finished_time = time.monotonic()
            requests.pop(rid, None)
        if req.params.output_kind is RequestOutputKind.FINAL_ONLY and not finished:
            continue
        outputs.append(make_output(req, final=finished))
    return outputs


def make_output(req: Request, final: bool) -> RequestOutput:
    """`req`'s RequestOutput per its output_kind; DELTA sends only what is new since the last."""
    delta = req.params.output_kind is RequestOutputKind.DELTA
    comps = []
    for seq in req.seqs:
        text = seq.output_text
        out_ids = seq.output_token_ids
        if delta:
            new_text = text[seq.num_sent_chars :]
            new_ids = out_ids[seq.num_sent_tokens :]
            lps = seq.logprobs[seq.num_sent_logprobs :] if seq.logprobs is not None else None
            if not new_ids and not new_text and not (final and seq.finish_reason):
                continue
            comps.append(
                CompletionOutput(
                    seq.index,
                    new_text,
                    new_ids,
                    seq.cumulative_logprob,
                    lps,
                    seq.finish_reason,
                    seq.stop_reason,
                )
            )
        else:
            comps.append(
                CompletionOutput(
                    seq.index,
                    text,
                    list(out_ids),
                    seq.cumulative_logprob,
                    list(seq.logprobs) if seq.logprobs is not None else None,
                    seq.finish_reason,
                    seq.stop_reason,
                )
            )
        seq.num_sent_chars = len(text)
        seq.num_sent_tokens = len(out_ids)
        seq.num_sent_logprobs = len(seq.logprobs) if seq.logprobs is not None else 0
    prompt_lp = req.prompt_logprobs
    if delta and req.extra.get("prompt_logprobs_sent"):
        prompt_lp = None
    req.extra["prompt_logprobs_sent"] = True
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        outputs=sorted(comps, key=lambda c: c.index),
        finished=final,
        prompt_logprobs=prompt_lp,
        num_cached_tokens=req.num_cached_tokens,
        metrics=RequestMetrics(req.arrival_time, req.first_token_time, req.finished_time),
    )
