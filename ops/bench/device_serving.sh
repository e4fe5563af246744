#!/usr/bin/env bash
# One call on the lent GPU machine: the serving benchmark (issue 8) in both engine modes, then one
# profiled run (ASYNCLLM_PROFILE_DIR: the server's loop, the engine process and its receiver).
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
COMMON="$COMMON --num-requests ${NUM_REQUESTS:-1024} --concurrency ${CONCURRENCY:-64,256}"
COMMON="$COMMON --rates ${RATES:-inf}"
NOTE="H200 lent machine; Qwen3-0.6B shape, random bf16 weights; word-level tokenizer"
for mode in ${MODES_RUN:-thread process}; do
  flag=""
  [ "$mode" = process ] && flag="--engine-process"
  echo "=== $mode $(date +%T)"
  timeout ${RUN_TIMEOUT:-240} python3 -m asyncllm.bench.serving $COMMON $flag --modes ${MODES:-engine,engine-sink,ws} \
    --note "$NOTE; engine $mode" --no-plot --out "$OUT/serving-$mode.json" 2>&1 | grep -v " INFO " | tail -8
done
if [ -n "${PROFILE-1}" ]; then  # PROFILE= (empty) skips it
  echo "=== profiled (process) $(date +%T)"
  ASYNCLLM_PROFILE_DIR="$OUT/prof" timeout 200 python3 -m asyncllm.bench.serving --model "$M" \
    --no-enable-prefix-caching --num-kv-blocks 8192 --rates inf --output-len 128 \
    --num-requests 512 --concurrency 256 --engine-process --modes ws --warmup 0 --no-plot \
    --out "$OUT/profiled.json" 2>&1 | grep -v " INFO " | tail -3
  # At most 8 files come back from the device: one text file of every profile's top entries.
  for f in "$OUT"/prof/*.pstats; do
    echo "##### $(basename "$f")"
    python3 -c "import pstats,sys; s=pstats.Stats(sys.argv[1]); s.sort_stats('tottime').print_stats(45); s.sort_stats('cumtime').print_stats(45)" "$f"
  done > "$OUT/profiles.txt" 2>&1
  rm -rf "$OUT/prof" "$OUT/profiled.json"
fi
echo "=== done $(date +%T)"
