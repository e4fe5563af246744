#!/usr/bin/env bash
# llama.cpp's Python bindings (llama-cpp-python, built from its PyPI sdist: it compiles llama.cpp
# with cmake, CPU backend, tuned for this machine's instruction set) in a venv of its own, for the
# llama.cpp anchor of `python -m asyncllm.bench cpu` (asyncllm/bench/llamacpp_worker.py).
# Its own venv because it brings its own numpy and needs nothing of ours; the worker reads the
# GGUF file and the prompt token ids the benchmark hands it. Idempotent: an existing venv with
# llama_cpp importable is kept. Prints the build's wall time.
set -euo pipefail
VENV=${1:-${LLAMACPP_VENV:-/work/venvs/llamacpp}}
VERSION=${LLAMACPP_VERSION:-0.3.36}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already set up in $VENV"
  exit 0
fi
t0=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# --no-binary: build llama.cpp here (no prebuilt wheel); GGML_NATIVE: -march=native, as a user
# building it on their machine gets; OpenMP for its thread pool (llama.cpp's default on Linux);
# LLAVA_BUILD=OFF: no multimodal library (51 of its 178 objects; the benchmark is text only)
CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF"} \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$VENV/bin/python" -m pip install -v --no-binary llama-cpp-python --no-cache-dir \
  "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "build took $(( $(date +%s) - t0 )) s"
