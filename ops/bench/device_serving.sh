#!/usr/bin/env bash
# One call on the lent GPU machine: the serving benchmark (issue 8, issue 22 point 12), by default
# the engine in its own process (as `asyncllm serve` runs it), at 64 and 256 streams, REPS=2
# repetitions one after the other (each: engine, engine-sink, ws in one machine), and a summary
# line per repetition with the ratios ws/engine and ws/engine-sink. MODES_RUN="thread process"
# adds the engine-thread mode; PROFILE=1 adds one profiled run (ASYNCLLM_PROFILE_DIR: the
# server's loop, the engine process and its receiver) at PROFILE_CONCURRENCY streams (default 64:
# where the gateway's first-token gap is, ops/bench/NOTES.md "Serving, fourth round"); ADMIT_AB
# (below) runs each repetition once per admission window. Estimated 4-5 min on an H200 (768 requests;
# each repetition loads the model twice, engine-direct and server, ~1.5-2 min):
#   ASYNCLLM_COMMIT=$(git rev-parse --short HEAD) timeout -s INT 350 bash ops/bench/device_serving.sh
# Plots: redraw here with `python -m asyncllm.bench.serving --replot FILE.json`. Needs the server's wheels in .whl/ (the image lacks starlette, websockets, orjson, uvicorn,
# tenacity, sniffio): carry ".whl". Results and profiles under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
# The device gets a copy of the working tree, not its history: pass the commit in.
export ASYNCLLM_COMMIT=${ASYNCLLM_COMMIT:-unknown}
echo "commit $ASYNCLLM_COMMIT" | tee -a "$OUT/env.txt"
M=$(python3 -c "from asyncllm.bench import model; print(model.build_model_dir())" | tail -1)
COMMON="--model $M --no-enable-prefix-caching --num-kv-blocks 8192 --output-len 128"
COMMON="$COMMON --num-requests ${NUM_REQUESTS:-768} --concurrency ${CONCURRENCY:-64,256}"
COMMON="$COMMON --rates ${RATES:-inf}"
NOTE="H200 lent machine; Qwen3-0.6B shape, random bf16 weights; word-level tokenizer"
echo "ASYNCLLM_ADMIT_COALESCE_MS=${ASYNCLLM_ADMIT_COALESCE_MS-} ASYNCLLM_ADMIT_QUIET_MS=${ASYNCLLM_ADMIT_QUIET_MS-} ADMIT_AB=${ADMIT_AB-}" | tee -a "$OUT/env.txt"
# ADMIT_AB="0 2": each repetition once per value of ASYNCLLM_ADMIT_COALESCE_MS (the engine loop's
# admission window; files serving-MODE-aVALUE-repN.json), interleaved. Unset: the environment's.
for rep in $(seq 1 "${REPS:-2}"); do
  for mode in ${MODES_RUN:-process}; do
    for adm in ${ADMIT_AB:-env}; do
      flag="" tag="$mode" set_adm=""
      [ "$mode" = process ] && flag="--engine-process"
      [ "$adm" != env ] && tag="$mode-a$adm" set_adm="ASYNCLLM_ADMIT_COALESCE_MS=$adm"
      echo "=== rep $rep $tag $(date +%T)"
      env $set_adm timeout -s INT ${RUN_TIMEOUT:-150} python3 -m asyncllm.bench.serving $COMMON \
        $flag --modes ${MODES:-engine,engine-sink,ws} --note "$NOTE; engine $tag; rep $rep" \
        --no-plot --out "$OUT/serving-$tag-rep$rep.json" 2>&1 | grep -v " INFO " | tail -8
    done
  done
done
# One line per repetition and load point: the ratios, and the client's share of a core (the
# load generator is one Python process; near 1.0 would mean it, not the server, set the pace).
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/serving-*-rep*.json")):
    d = json.load(open(f))
    runs = {(r["mode"], r["concurrency"]): r for r in d["runs"]}
    for c in d["workload"]["concurrency"]:
        ws = runs.get(("ws", c))
        parts = [f.rsplit("/", 1)[-1], f"conc={c}"]
        for m in ("engine", "engine-sink", "ws"):
            r = runs.get((m, c))
            parts.append(f"{m}={r['delivered_tok_s']:.0f}" if r else f"{m}=-")
        for a in ("engine", "engine-sink"):
            r = runs.get((a, c))
            ok = ws and r and r["delivered_tok_s"]
            parts.append(f"ws/{a}={ws['delivered_tok_s'] / r['delivered_tok_s']:.3f}" if ok else f"ws/{a}=-")
        if ws:
            parts.append(f"client_cpu_share={ws['bench_process_cpu_s'] / ws['duration_s']:.2f}")
            parts.append(f"ws_ttft_p50={ws['ttft_ms']['p50']:.1f}ms tpot_p50={ws['tpot_ms']['p50']:.2f}ms")
        r = runs.get(("engine-sink", c))
        if r:
            parts.append(f"sink_ttft_p50={r['ttft_ms']['p50']:.1f}ms tpot_p50={r['tpot_ms']['p50']:.2f}ms")
        # Engine steps per mode against tokens/concurrency (every batch full): the turnover cost.
        for m in ("engine", "engine-sink", "ws"):
            r = runs.get((m, c))
            if r and r.get("engine_steps") is not None:
                parts.append(f"steps_{m}={r['engine_steps']}/{r['ideal_steps']:.0f}")
        print("SUMMARY " + " ".join(parts))
PY
if [ -n "${PROFILE-}" ]; then  # PROFILE=1 adds it
  echo "=== profiled (process) $(date +%T)"
  ASYNCLLM_PROFILE_DIR="$OUT/prof" timeout 200 python3 -m asyncllm.bench.serving --model "$M" \
    --no-enable-prefix-caching --num-kv-blocks 8192 --rates inf --output-len 128 \
    --num-requests 512 --concurrency ${PROFILE_CONCURRENCY:-64} --engine-process --modes ws \
    --warmup 0 --no-plot \
    --out "$OUT/profiled.json" 2>&1 | grep -v " INFO " | tail -3
  # At most 8 files come back from the device: one text file of every profile's top entries.
  for f in "$OUT"/prof/*.pstats; do
    echo "##### $(basename "$f")"
    python3 -c "import pstats,sys; s=pstats.Stats(sys.argv[1]); s.sort_stats('tottime').print_stats(45); s.sort_stats('cumtime').print_stats(45)" "$f"
  done > "$OUT/profiles.txt" 2>&1
  rm -rf "$OUT/prof" "$OUT/profiled.json"
fi
echo "=== done $(date +%T)"
