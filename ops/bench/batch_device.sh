#!/usr/bin/env bash
# Issue 17, persistent batch (ASYNCLLM_PERSISTENT_BATCH) and the inlined decode bookkeeping: one
# call on the lent H200 (~4 min; limits 120 + 200 s).
#   bash ops/bench/batch_device.sh        (writes $OUT/batch.log; RESULT lines as each run ends)
# 1. the GPU-marked engine tests and the step-message tests (on CUDA: the pinned, double-buffered
#    staging path, checked field by field against the list path);
# 2. Qwen3-0.6B shape, the peer workload (256 requests, temperature 0.6, detokenized), asyncllm
#    only, one engine: the persistent batch off/on interleaved (`-batch` = every lever but it),
#    then all levers off and on. The inlined scheduler/_append_token paths ride on `host`.
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  echo "commit ${ASYNCLLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  # The engine tests run with the persistent batch on: that is what this call validates.
  # Progress bars of the tiny models' save/load go to the file, not the log.
  for pb in 1 0; do
    echo "=== gpu tests: step message, engine; ASYNCLLM_PERSISTENT_BATCH=$pb"
    ASYNCLLM_PERSISTENT_BATCH=$pb timeout -s INT ${TEST_TIMEOUT:-280} python3 -m pytest -q -rfE \
      --tb=short -p no:cacheprovider tests/test_step_message.py tests/test_gpu_engine.py \
      > "$OUT/tests-pb$pb.txt" 2>&1
    grep -E "^(FAILED|ERROR|E  )|passed|failed" "$OUT/tests-pb$pb.txt" | tail -25
    [ -n "${BOTH:-}" ] || break
  done
  [ "${LEVERS:-1}" = 1 ] || exit 0
  echo "=== qwen3-0.6b"
  timeout -s INT 200 python3 -m asyncllm.bench.levers --shape qwen3-0.6b \
    --schedule=-batch,on,-batch,on,off,on 2>&1 | grep -v Warning
} 2>&1 | tee "$OUT/batch.log"
