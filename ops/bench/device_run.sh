#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests, kernel timings, benchmarks; logs and results under
# $OUT. Choose stages with STAGES="kernels engine kbench latency throughput" and pass extra
# benchmark flags in BENCH_ARGS (e.g. "--baseline hf").
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES=${STAGES:-"kernels kbench engine latency throughput"}
BENCH_ARGS=${BENCH_ARGS:-}
{
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    kernels) timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py --durations=3 2>&1 | tee "$OUT/kernels.log" | tail -6 ;;
    engine) timeout 500 python3 -m pytest -q -p no:cacheprovider -s tests/test_fused_kernels.py tests/test_gpu_engine.py tests/test_models.py --durations=5 2>&1 | tee "$OUT/engine.log" | grep -E "passed|failed|FAILED|Error|logprob" | tail -25 ;;
    kbench) timeout 300 python3 -m asyncllm.bench.kernel_bench --json "$OUT/kernels.json" ${KBENCH_ARGS:-} 2>&1 | tail -30 ;;
    latency) timeout 400 python3 -m asyncllm.bench latency --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/latency.log" | grep -v " INFO " | tail -12 ;;
    throughput) timeout 500 python3 -m asyncllm.bench throughput --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/throughput.log" | grep -v " INFO asyncllm.engine.llm" | tail -14 ;;
    profile) timeout 200 python3 -m asyncllm.bench.profile_engine --no-cprofile 2>&1 | grep -v " INFO " | tail -5 ;;
  esac
done
echo "=== done $(date +%T)"
