#!/usr/bin/env bash
# One call on an H200 (issue 15, the small-batch quantized kernels): about 5 minutes.
#   (a) the GPU-marked tests of the quantized kernels and methods (pytest's summary printed:
#       SIGINT at the limit);
#   (b) the kernels old vs new on Llama-3-8B's linears at M = 1, 4, 16, 64, 256, in CUDA graphs
#       over more weight copies than L2 holds: us per call, GB/s, share of the copy bandwidth
#       (python -m asyncllm.bench.quant_kernels);
#   (c) the engine on the Llama-3-8B shape, random weights drawn on the device: throughput
#       (nano-vllm's workload) and 1-stream latency for bf16 / fp8 / GPTQ-int4
#       (python -m asyncllm.bench quant).
# Out: $OUT/quant-device.json (kernels, engine records, test summary) and $OUT/quant-device.log.
#   OUT=/tmp/out bash ops/bench/quant_device.sh
# Knobs: NUM_REQUESTS (256), TEST_LIMIT (150 s), KERNEL_LIMIT (120 s), ENGINE_TIMEOUT (100 s a
# format), ASYNCLLM_QUANT_KERNELS=tile for the engine run on the first kernels.
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
LOG="$OUT/quant-device.log"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false ASYNCLLM_BENCH_DIR="$WORK/bench"
export ASYNCLLM_COMMIT=${ASYNCLLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
: >"$LOG"
start=$(date +%s)
stamp() { echo "=== $1 ($(($(date +%s) - start)) s)" | tee -a "$LOG"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  2>&1 | tee -a "$LOG"

stamp "(a) GPU tests"
timeout -s INT "${TEST_LIMIT:-150}" python3 -m pytest -m gpu -q -rfEs --tb=short \
  -p no:cacheprovider tests/test_quant_kernels.py tests/test_quantization.py \
  >"$WORK/tests.log" 2>&1
echo "pytest exit $?" >>"$WORK/tests.log"
tail -40 "$WORK/tests.log" | tee -a "$LOG"

stamp "(b) kernels old vs new"
timeout -s INT "${KERNEL_LIMIT:-120}" python3 -m asyncllm.bench.quant_kernels \
  --out "$WORK/kernels" 2>&1 | grep -v '^{' | tee -a "$LOG"

stamp "(c) engine: bf16 / fp8 / gptq-int4"
timeout -s INT 330 python3 -m asyncllm.bench quant --num-requests "${NUM_REQUESTS:-256}" \
  --timeout "${ENGINE_TIMEOUT:-100}" --out "$WORK/engine" 2>&1 | tee -a "$LOG" | \
  grep -E '^(---|bf16|fp8|gptq|wrote)|Error|error' || true

stamp "merge"
python3 - "$WORK" "$OUT/quant-device.json" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
work, out = sys.argv[1], sys.argv[2]
def load(pattern):
    recs = []
    for p in sorted(glob.glob(f"{work}/{pattern}/*.json")):
        recs += json.load(open(p))
    return recs
tests = open(f"{work}/tests.log").read().splitlines()
summary = [ln for ln in tests if " passed" in ln or " failed" in ln or "error" in ln.lower()][-3:]
doc = {"tests": summary, "kernels": load("kernels"), "engine": load("engine")}
json.dump(doc, open(out, "w"), indent=1)
print(f"wrote {out}: {len(doc['kernels'])} kernel records, {len(doc['engine'])} engine records")
for r in doc["engine"]:
    print(f"  {r['format']:10s} {r['benchmark']:16s} {r['value']:10.2f} {r['unit']:9s} "
          f"roofline share {r['ratio_to_roofline']}  vs bf16 {r['ratio_to_baseline']}")
PY
stamp "done"
