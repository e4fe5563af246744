#!/usr/bin/env bash
# FlashAttention-4 onto the lent GPU machine in two calls (64 MiB a call; see
# shared/peer_gpu/README.md), then whatever needs it. Build the carry here first:
# .carry/cuA/cu13.part.aa, .carry/cuB/cu13.part.ab (split -b 33000000 of the libs-cu13 wheel,
# unzipped and tar -cJf), .carry/fa4b/*.whl (the other wheels), .carry/peer (nano-vllm + shim).
#   call A: carry [".carry/cuA"]:  bash ops/bench/fa4_device.sh stage
#   call B (within 30 s): carry [".carry/cuB", ".carry/fa4b", ".carry/peer"]:
#           bash ops/bench/fa4_device.sh unpack && source ops/bench/fa4_device.sh env && ...
set -uo pipefail
case "${1:-}" in
  stage)
    mkdir -p /tmp/fa4parts && cp .carry/cuA/cu13.part.aa /tmp/fa4parts/ && ls -la /tmp/fa4parts ;;
  unpack)
    if [ ! -d /tmp/site-fa4/nvidia_cutlass_dsl ]; then
      test -f /tmp/fa4parts/cu13.part.aa || { echo "part aa missing: machine went cold"; exit 3; }
      mkdir -p /tmp/site-fa4
      cat /tmp/fa4parts/cu13.part.aa .carry/cuB/cu13.part.ab | tar -xJf - -C /tmp/site-fa4
      for w in .carry/fa4b/*.whl; do python3 -m zipfile -e "$w" /tmp/site-fa4; done
    fi
    PYTHONPATH=/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages python3 -c \
      "import flash_attn.cute as c; print('fa4 ok', c.__file__)" ;;
  env)
    export PYTHONPATH=/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages:$PWD ;;
esac
