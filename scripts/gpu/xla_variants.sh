#!/usr/bin/env bash
# One device call: the untraced wall/host/dispatch ms per step of scripts/gpu/device_profile.py under XLA GPU
# command-buffer (CUDA graph) settings, against the defaults, each in a fresh process (XLA reads its flags at
# backend start). Command buffers replace per-kernel launches by graph launches, which is what the dispatch
# time of a step is made of; whether they pay depends on how often XLA must update a graph whose buffers moved.
# Usage (repository root, PYTHONPATH set): bash scripts/gpu/xla_variants.sh [device_profile.py arguments]
set -u
graphs="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"
unrolled="$graphs --xla_gpu_command_buffer_unroll_loops=true"
remapped="$unrolled --xla_gpu_command_buffer_update_mode=SKIP_TEMP"
variants=("" "$graphs" "$unrolled" "$remapped")
for flags in "${variants[@]}"; do
  echo "### XLA_FLAGS=${flags:-(none)}"
  XLA_FLAGS="$flags" timeout 150 python scripts/gpu/device_profile.py --no-trace "$@" 2>&1 | grep -E "^== |Error|error:" | head -6
done
