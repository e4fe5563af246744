#!/usr/bin/env bash
# Issue 17, host and sampling levers: one call on the lent H200 (~5 min; limits 60+140+170 s = 6.2 min at worst, RESULT lines print as each run ends so a cut run keeps what it measured).
#   bash ops/bench/levers_device.sh        (writes $OUT/levers.json and $OUT/levers.log)
# 1. the GPU tests of the sampler and its kernel (frequencies, one host sync, seeds);
# 2. Qwen3-0.6B shape, the peer workload (256 requests, temperature 0.6, detokenized), asyncllm
#    only, one engine: every lever off/on interleaved twice, then each lever off alone; 1-stream
#    latency with all off and all on;
# 3. Qwen3-8B shape (the model directory is built on the device, ~1 min): off, on, on but the
#    sampler; latency off and on.
# Levers (asyncllm/envs.py): sampler = ASYNCLLM_SAMPLER_FUSED, host = ASYNCLLM_HOST_FASTPATH,
# detok = ASYNCLLM_DETOK_FAST, gc = ASYNCLLM_GC_FREEZE; asyncllm/bench/levers.py switches them on
# the live engine between runs.
set -uo pipefail
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
LOG=$OUT/levers.log
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  git rev-parse --short HEAD 2>/dev/null || echo "${ASYNCLLM_COMMIT:-no-git}"
  echo "=== gpu tests: sampler and its kernel"
  timeout -s INT 60 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider \
    tests/test_sampling_kernel.py tests/test_sampler.py 2>&1 | tail -15
  echo "=== qwen3-0.6b"
  timeout -s INT 140 python3 -m asyncllm.bench.levers --shape qwen3-0.6b --latency \
    --schedule off,on,off,on,-sampler,-host,-detok,-gc 2>&1 | grep -v Warning
  echo "=== qwen3-8b"
  timeout -s INT 170 python3 -m asyncllm.bench.levers --shape qwen3-8b --latency \
    --schedule off,on,-sampler 2>&1 | grep -v Warning
} 2>&1 | tee "$LOG"
python3 - "$LOG" "$OUT/levers.json" <<'PY'
import json, sys
recs = [json.loads(l[7:]) for l in open(sys.argv[1]) if l.startswith("RESULT ")]
summary = {}
for shape in sorted({r["shape"] for r in recs}):
    rs = [r for r in recs if r["shape"] == shape]
    off = [r["tok_per_s"] for r in rs if r["config"] == "off"]
    base = sum(off) / len(off) if off else None
    summary[shape] = {
        r["config"] + (f"#{i}" if [x["config"] for x in rs].count(r["config"]) > 1 else ""): {
            "tok_per_s": round(r["tok_per_s"], 1),
            "ratio_to_off": round(r["tok_per_s"] / base, 4) if base else None,
            **({"ms_per_token": round(r["ms_per_token"], 3)} if "ms_per_token" in r else {}),
        }
        for i, r in enumerate(rs)
    }
json.dump({"benchmark": "issue17_levers", "runs": recs, "summary": summary}, open(sys.argv[2], "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
