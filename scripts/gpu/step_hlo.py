"""The GPU-compiled program of one steady-state engine step, for reading what XLA did to it: writes the
optimized HLO text and prints every copy larger than 64 MiB (Qwen3-1.7B-shaped random bf16, 128 requests at
2048 tokens, vanilla).

  PYTHONPATH=$PWD python scripts/gpu/step_hlo.py OUT_DIR
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sparsespec_jax.benchmark.shapes import QWEN3_1_7B, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.spec.config import SpecConfig

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def large_copies(hlo: str, min_bytes: int = 64 << 20) -> list[str]:
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= (\w+)\[([\d,]*)\]\S* (copy|copy-start|fusion|custom-call)\(", line)
        if not match or ("copy" not in match.group(3) and "copy" not in line.split("=")[0]):
            continue
        size = BYTES.get(match.group(1), 4) * int(np.prod([int(d) for d in match.group(2).split(",") if d]))
        if size >= min_bytes:
            found.append(f"{size / 2**20:9.1f} MiB  {line.strip()[:220]}")
    return found


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(dtype="bfloat16", max_batch_size=128, kv_cache_tokens=128 * 2400, max_model_len=2400,
                          max_num_batched_tokens=128 * 9, min_batch_bucket=16, min_context_bucket=2400)
    engine = Engine(QWEN3_1_7B, random_params(QWEN3_1_7B, seed=0, dtype=jnp.bfloat16), placeholder_tokenizer(),
                    config, SpecConfig(method="none"))
    place_at_context(engine, 128, 2048, 50, seed=1)
    step_fn, calls = engine._step_fn, []
    engine._step_fn = lambda *args: calls.append(args) or step_fn(*args)
    for _ in range(3):
        engine.step()
    compiled = step_fn.lower(*calls[-1]).compile()
    hlo = compiled.as_text()
    (out / "step_vanilla_gpu.hlo.txt").write_text(hlo)
    print(compiled.memory_analysis())
    print("\n".join(large_copies(hlo)) or "no copy of 64 MiB or more")


if __name__ == "__main__":
    main()
