#!/usr/bin/env bash
# Issue 17's attention levers in one call on the lent GPU (~4-5 min on an H200):
#   (a) the GPU attention tests (decode v1/v2, prefill, FA4 where it imports), pytest's summary
#       always printed (SIGINT at the limit);
#   (b) decode kernel triton-v1 vs v2 vs FA4, in a CUDA graph, batch 1/64/256 x context
#       512/2048/U[100,2048], Qwen3-0.6B and Qwen3-8B heads, GB/s against the copy bandwidth;
#       prefill triton vs FA4;
#   (c) the engine on the peer's terms (256 requests, temperature 0.6, detokenized, 0.6B shape)
#       once per attention choice (ASYNCLLM_DECODE_ATTENTION / ASYNCLLM_PREFILL_ATTENTION).
# Writes $OUT/attn_ab.json and $OUT/attn.log. FA4: used when /tmp/site-fa4 holds it (unpacked as
# shared/peer_gpu/README.md says); without it the FA4 rows are left out, nothing fails.
#   bash ops/bench/attn_device.sh            (from the repository root)
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
LOG="$OUT/attn.log"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
if [ -d /tmp/site-fa4/nvidia_cutlass_dsl ]; then
  export PYTHONPATH=$PYTHONPATH:/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages
  # FA4 compiles on first use (tens of seconds a kernel): keep them on disk for the engine runs
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4-cache
fi
{
  echo "=== env $(date +%T)"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  git rev-parse HEAD 2>/dev/null || echo "commit: ${ASYNCLLM_COMMIT:-unknown}"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "
from asyncllm.engine.kernels import fa4_attention as f
print('fa4 available:', f.available())
try:
    import flash_attn.cute.interface  # noqa: F401
except Exception as e:
    print('flash_attn.cute does not import:', type(e).__name__, str(e)[:300])
" 2>&1 | tail -2
  echo "=== (a) gpu tests $(date +%T)"
  timeout -s INT 100 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider \
    tests/test_kernels.py tests/test_attention_kernels_select.py 2>&1 | tail -40
  # the sm90 build of the decode kernels keeps its K/V loads pipelined with this triton too
  timeout -s INT 60 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
    tests/test_decode_kernel_build.py 2>&1 | tail -8
  echo "=== (b, c) kernels and engine $(date +%T)"
  timeout -s INT 360 python3 -m asyncllm.bench.attn_ab --json "$OUT/attn_ab.json" \
    --engine-timeout 110 2>&1 | grep -v " INFO "
  echo "=== done $(date +%T)"
} 2>&1 | tee "$LOG"
