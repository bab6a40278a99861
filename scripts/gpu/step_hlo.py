"""The GPU-compiled program of one steady-state engine step, for reading what XLA did to it: writes the
optimized HLO text, prints every copy larger than 64 MiB, and lists the step's output allocations that are not
donated inputs with every value XLA placed in them. Such an allocation moves on every call, so each CUDA-graph
command touching it (the layer loop's, if a loop temporary landed there) is re-recorded on every call. Random
bf16 weights, requests placed at a context, acceptance replayed; the program compiled is the last step's.

  PYTHONPATH=$PWD python scripts/gpu/step_hlo.py OUT_DIR [--shape qwen3-1.7b-shaped] [--method none]
      [--batch 128] [--context 2048]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="step-hlo-")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_module_re=.*step_fn.*").strip()

import jax.numpy as jnp  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from sparsespec_jax.benchmark.shapes import SHAPES, placeholder_tokenizer  # noqa: E402
from sparsespec_jax.benchmark.steady_state import place_at_context  # noqa: E402
from sparsespec_jax.engine import Engine, EngineConfig  # noqa: E402
from sparsespec_jax.model import random_params  # noqa: E402
from sparsespec_jax.spec.config import SpecConfig  # noqa: E402

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)


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


def fresh_output_allocations(assignment: str) -> list[str]:
    """From an XLA buffer-assignment dump: each output allocation that is not an entry parameter (a donated
    input), with the values placed in it."""
    found, keep = [], False
    for line in assignment.splitlines():
        if line.startswith("allocation "):
            keep = "maybe-live-out" in line and "parameter" not in line and "output shape is" not in line
            if keep:
                found.append(line[:120])
        elif keep and line.startswith(" value:"):
            found.append("    " + line.strip()[:160])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="qwen3-1.7b-shaped", choices=sorted(SHAPES))
    parser.add_argument("--method", default="none")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    max_len = args.context + 400
    config = EngineConfig(dtype="bfloat16", max_batch_size=args.batch, kv_cache_tokens=args.batch * max_len,
                          max_model_len=max_len, max_num_batched_tokens=args.batch * 9, min_context_bucket=max_len)
    spec = SpecConfig(method=args.method, k=8, replay_acceptance=REPLAY if args.method != "none" else None)
    shape = SHAPES[args.shape]
    engine = Engine(shape, random_params(shape, seed=0, dtype=jnp.bfloat16), placeholder_tokenizer(), config, spec)
    place_at_context(engine, args.batch, args.context, 200, seed=1)
    step_fn, calls = engine._step_fn, []
    engine._step_fn = lambda *call: calls.append(call) or step_fn(*call)
    for _ in range(30):
        engine.step()
    compiled = step_fn.lower(*calls[-1]).compile()
    hlo = compiled.as_text()
    path = args.out / f"step_{args.method}_{args.shape}_gpu.hlo.txt"
    path.write_text(hlo)
    print(f"{path}: {compiled.memory_analysis()}")
    print("\n".join(large_copies(hlo)) or "no copy of 64 MiB or more")
    [assignment] = sorted(glob.glob(f"{DUMP}/*step_fn*after_optimizations-buffer-assignment.txt"),
                          key=os.path.getmtime)[-1:]
    print("output allocations that move on every call, and what XLA placed in them:")
    print("\n".join(fresh_output_allocations(Path(assignment).read_text())) or "  none")


if __name__ == "__main__":
    main()
