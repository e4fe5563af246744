"""How close the default model's compact CPU path (cpu_weights="quantized": the GGUF blocks
multiplied by asyncllm.engine.kernels.cpu_quant) is to its float32 path (the same blocks
dequantized at load), and how fast each is, on this machine.

Both engines get the same chat prompts (the cpu benchmark's), greedy, EOS ignored. Reported:
token agreement (same token at the same position, over all positions), whole outputs
identical, where the first divergence falls, and over each output's common prefix (where both
paths condition on the same tokens) the max and mean |logprob difference| of the chosen token.
Then throughput of each path at `--streams` concurrent prompts and at one stream.

    python -m asyncllm.bench.cpu_quant_accuracy --prompts 32 --tokens 64 --out results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from asyncllm.bench.cpu import chat_prompts


def _run(mode: str, prompt_ids: list[list[int]], tokens: int, threads: int) -> tuple[Any, Any]:
    from asyncllm import LLM, SamplingParams

    llm = LLM(None, device="cpu", dtype="float32", cpu_weights=mode, max_num_seqs=64)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    llm.generate([{"prompt_token_ids": prompt_ids[0]}], sp, use_tqdm=False)  # warm-up
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
    return llm, outs


def _throughput(llm: Any, prompt_ids: list[list[int]], tokens: int, repeats: int) -> list[float]:
    from asyncllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
        rates.append(len(prompt_ids) * tokens / (time.perf_counter() - t))
    return rates


def _chosen_logprobs(out: Any) -> list[float]:
    c = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]


def compare(ref: list[Any], got: list[Any]) -> dict[str, Any]:
    same = total = identical = 0
    first_div: list[int] = []
    diffs: list[float] = []
    for a, b in zip(ref, got, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        total += len(ta)
        same += sum(x == y for x, y in zip(ta, tb, strict=False))
        k = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), len(ta))
        identical += k == len(ta)
        first_div.append(k)
        la, lb = _chosen_logprobs(a), _chosen_logprobs(b)
        # up to and including the first divergence: both paths saw the same tokens before it
        diffs += [abs(x - y) for x, y in zip(la[: k + 1], lb[: k + 1], strict=False)]
    return {
        "token_agreement": same / total,
        "outputs_identical": identical,
        "outputs": len(ref),
        "first_divergence_median": statistics.median(first_div),
        "first_divergence_min": min(first_div),
        "logprob_abs_diff_max": max(diffs),
        "logprob_abs_diff_mean": statistics.fmean(diffs),
        "logprob_positions": len(diffs),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=64, help="throughput: concurrent prompts")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs per path (median)")
    ap.add_argument("--single-tokens", type=int, default=64, help="tokens of the 1-stream run")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from asyncllm.engine.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None))
    prompts = chat_prompts(max(args.prompts, args.streams))
    # as the cpu benchmark: the template's text, encoded without extra specials
    texts = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    outs, speed = {}, {}
    for mode in ("float32", "quantized"):
        llm, outs[mode] = _run(mode, ids[: args.prompts], args.tokens, torch.get_num_threads())
        if not args.no_speed:
            speed[mode] = {
                f"{args.streams}_streams_tok_s": _throughput(
                    llm, ids[: args.streams], args.tokens, args.repeats
                ),
                "1_stream_tok_s": _throughput(llm, ids[:1], args.single_tokens, args.repeats),
            }
        llm.shutdown()
    result["accuracy"] = compare(outs["float32"], outs["quantized"])
    if speed:
        for mode in speed:
            for k, v in list(speed[mode].items()):
                speed[mode][k.replace("_tok_s", "_median")] = statistics.median(v)
        result["speed"] = speed
        result["ratio_quantized_over_float32"] = {
            k: speed["quantized"][k] / speed["float32"][k]
            for k in speed["float32"]
            if k.endswith("_median")
        }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
