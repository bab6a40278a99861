#!/usr/bin/env bash
# One device call: scripts/gpu/device_profile.py (layer loop) under XLA GPU settings that may remove the
# loop's per-step weight copy (memcpy128) or the per-kernel launch cost (host and dispatch ms), against the
# defaults. Prints each variant's per-method summary and top kernels. (UNROLL_LAYERS=on device_profile.py
# gives the unrolled comparison; it compiles ~5x longer, so it is not part of this call.)
# Usage (repository root, PYTHONPATH set): bash scripts/gpu/xla_variants.sh
set -u
cublas_slices="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true"
graphs="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
variants=("" "$cublas_slices" "$graphs" "$cublas_slices $graphs")
for flags in "${variants[@]}"; do
  echo "### XLA_FLAGS=${flags:-(none)}"
  XLA_FLAGS="$flags" timeout 130 python scripts/gpu/device_profile.py /tmp/sparsespec-trace 2>&1 | grep -A8 "^== "
done
