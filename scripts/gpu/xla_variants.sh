#!/usr/bin/env bash
# One device call: scripts/gpu/device_profile.py under XLA GPU settings that may remove the layer loop's
# per-step weight copy (memcpy128) or the per-kernel launch cost (host and dispatch ms), against the defaults
# and unrolled layers. Prints each variant's per-method summary and top kernels.
# Usage (repository root, PYTHONPATH set): bash scripts/gpu/xla_variants.sh
set -u
variants=(
  ""
  "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true"
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
)
for flags in "${variants[@]}"; do
  echo "### XLA_FLAGS=${flags:-(none)}"
  XLA_FLAGS="$flags" timeout 110 python scripts/gpu/device_profile.py /tmp/sparsespec-trace 2>&1 | grep -A6 "^== "
done
echo "### unrolled layers"
UNROLL_LAYERS=on timeout 280 python scripts/gpu/device_profile.py /tmp/sparsespec-trace 2>&1 | grep -A6 "^== "
