#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU-marked tests of the given files (default: all), with
# pytest's summary always printed (SIGINT at the limit, not SIGKILL), log under $OUT.
# TESTS="tests/test_quant_kernels.py ..." LIMIT=240 bash ops/bench/device_tests.sh
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
timeout -s INT "${LIMIT:-300}" python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider \
  ${TESTS:-tests} 2>&1 | tee "$OUT/gpu-tests.log" | tail -60
