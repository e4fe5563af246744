#!/usr/bin/env bash
# Issue 16 on the device: the grammar's GPU tests, then the constrained-decoding overhead at 64
# streams (python -m asyncllm.bench.grammar). One call, ~3 min; run from the repo root with
# carry [".carry/xg"]: xgrammar and what it imports that the image lacks (pydantic, jsonschema
# for the tests) as cp312 wheels, and SmolLM2's tokenizer (saved from the default model's GGUF,
# which at 98 MB cannot travel). The model: Qwen3-0.6B's shape with random weights and
# SmolLM2's 49152-token vocabulary, so the grammar sees a real byte-level tokenizer (the bench
# model's word-level <tN> vocabulary has no '{' to match). Writes $OUT/grammar-gpu-*.json and
# $OUT/grammar_device.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/grammar_device.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-xg \
    .carry/xg/*.whl || exit 1
export PYTHONPATH=/tmp/site-xg:$PWD
python3 -c "import xgrammar, pydantic, jsonschema; print('xgrammar ok')" || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

echo "== GPU grammar tests"
timeout -s INT 120 python3 -m pytest -q -m gpu -rs tests/test_structured_outputs.py

echo "== model: Qwen3-0.6B shape, SmolLM2 vocabulary, random weights"
MODEL=/tmp/xg-model
timeout -s INT 60 python3 - "$MODEL" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
from asyncllm.bench.model import QWEN3_0_6B, build_model_dir
out = Path(sys.argv[1])
shape = dict(QWEN3_0_6B, vocab_size=49152, bos_token_id=1, eos_token_id=2)
build_model_dir(out, shape=shape)
for f in out.glob("*token*"):  # the word-level tokenizer build_model_dir wrote
    f.unlink()
for f in Path(".carry/xg/smollm2-tokenizer").iterdir():
    shutil.copy(f, out / f.name)
print(sorted(p.name for p in out.iterdir()))
PY

# OVERLAP_AB=1: this run with the fill's worker thread on (opt-in since a9c218e), the one below off
[ -n "${OVERLAP_AB:-}" ] && export ASYNCLLM_GRAMMAR_OVERLAP=1
echo "== benchmark: 64 streams, 256 tokens, ${ROUNDS:-2} rounds"
timeout -s INT 240 python3 -m asyncllm.bench.grammar --device cuda --model "$MODEL" \
    --streams 64 --max-tokens 256 --rounds ${ROUNDS:-2} ${PROFILE:+--profile} --out "$OUT"
echo "rc=$?"
# OVERLAP_AB=1: the same benchmark with the fill back on the engine thread (the A/B of the
# worker-thread fill), into $OUT/overlap-off.
if [ -n "${OVERLAP_AB:-}" ]; then
    echo "== benchmark again, ASYNCLLM_GRAMMAR_OVERLAP=0"
    mkdir -p "$OUT/overlap-off"
    ASYNCLLM_GRAMMAR_OVERLAP=0 timeout -s INT 240 python3 -m asyncllm.bench.grammar \
        --device cuda --model "$MODEL" --streams 64 --max-tokens 256 --rounds ${ROUNDS:-2} \
        --out "$OUT/overlap-off"
    echo "rc=$?"
fi
