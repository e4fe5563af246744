#!/usr/bin/env bash
# Tensor parallelism on a lent multi-GPU machine (nvidia-h200-x2 or larger), one call: the
# tensor-parallel tests (their GPU-marked ones need >= 2 GPUs, tp=4 needs 4), then throughput and
# latency on the Qwen3-0.6B shape at tp=1 and tp=2 (and tp=4 when 4 GPUs are visible), then the
# step-message broadcast's host cost. Logs and results under $OUT. NVLink multicast stays off
# (the engine sets it in every rank too; set here for the test process and NCCL's own probes).
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGES=${STAGES:-"tests throughput latency broadcast"}
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
SIZES="1 2"
[ "$GPUS" -ge 4 ] && SIZES="1 2 4"
{
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())"
  git rev-parse HEAD 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py --durations=5 2>&1 | tee "$OUT/tp_tests.log" | tail -15 ;;
    throughput) for tp in $SIZES; do timeout 300 python3 -m asyncllm.bench throughput --tensor-parallel-size "$tp" --out "$OUT" 2>&1 | tee "$OUT/throughput_tp$tp.log" | grep -E "^asyncllm:|Error|error" | tail -3; done ;;
    latency) for tp in $SIZES; do timeout 240 python3 -m asyncllm.bench latency --tensor-parallel-size "$tp" --out "$OUT" 2>&1 | tee "$OUT/latency_tp$tp.log" | grep -E "^asyncllm:|Error|error" | tail -3; done ;;
    broadcast) for r in 2 4 8; do timeout 60 python3 -m asyncllm.bench.tp_broadcast --ranks "$r" 2>&1 | tee "$OUT/broadcast_$r.log"; done ;;
  esac
done
echo "=== done $(date +%T)"
