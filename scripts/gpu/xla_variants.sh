#!/usr/bin/env bash
# One device call: the untraced wall/host/dispatch ms per step of scripts/gpu/device_profile.py with and without
# the CUDA-graph flags (sparsespec_jax/xla_flags.py), each in a fresh process (XLA reads its flags at backend
# start). Graphs replace per-kernel launches, which is what a step's dispatch time is made of; they pay when
# XLA re-records few commands per call (the per-program dispatch lines show it).
# Usage (repository root, PYTHONPATH set): bash scripts/gpu/xla_variants.sh [device_profile.py arguments]
set -u
for graphs in 0 1; do
  echo "### SPARSESPEC_CUDA_GRAPHS=$graphs"
  SPARSESPEC_CUDA_GRAPHS=$graphs timeout 150 python scripts/gpu/device_profile.py --no-trace "$@" 2>&1 \
    | grep -E "^== |^  |Error|error:" | head -12
done
