#!/usr/bin/env bash
# On the GPU machine: collect the carried model parts outside the repository (each call's carry replaces
# the carried folders) and, once both are there, join them and check the sha256.
# Usage: receive_model.sh 1   (call carrying .model/part1)   then   receive_model.sh 2   (carrying .model/part2)
# Prints the joined GGUF path on success.
set -euo pipefail
store="$HOME/sparsespec-model"
mkdir -p "$store"
cp .model/part"$1"/* "$store"/
if [ "$1" = 2 ]; then
  cat "$store"/smollm2.gguf.part-aa "$store"/smollm2.gguf.part-ab > "$store"/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat "$store"/sha256)  $store/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - >&2
  echo "$store/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
