"""End-to-end throughput on the H200, every draft method side by side (`sparsespec bench` with the configuration
below; any flag given here overrides it). One workload per device call: `--workload shaped` or `--workload real`.

What is measured, in this order (the time budget stops launching points after 480 s; skipped points are listed):

1. shaped: Qwen3-8B-shaped, random bf16 weights, batch 128 placed at contexts 2048, 4096 and 5120 with random KV
   (no prefill; 5120 is about the largest that fits one H200 at this batch). Per method and context: 20 warm-up
   steps, then 32 timed steps (tokens/s, host ms/step, tokens per step, acceptance), then a second engine in
   sync mode for 10 + 6 steps (device ms/step = median wait right after dispatch), then the attention
   dispatches alone at that composition (attention vs GEMM/other). Acceptance is REPLAYED from
   bench/systems_ablation.py's SmolLM2 distribution for every draft method, capped by the drafts a row really
   has. Tokens/s is then integrated over outputs of 1024..6016 tokens after a 128-token prompt (per-token time
   piecewise linear between the contexts, extended linearly beyond them). About 2 minutes for two methods.
2. real: SmolLM2-135M-Instruct (bfloat16), batch 256, 128 and 64, steady-state windows at contexts 7680, 4096 and
   2048 (largest first: the time budget cuts the tail): each request's context is prefilled with
   chat-templated reasoning prompts (bench/data) back to back, 16k tokens per fill step (requests done first
   decode meanwhile; the mean context at the window's start is recorded), then 20 warm-up and 32 timed steps
   at T=0.6 with real acceptance, then the sync-mode window. Batch 256 and 128 at 7680 and 4096 took 332 s.
   `--real-context-source generated` fills the contexts with each prompt's own vanilla continuation instead
   (generated once per run: 976k tokens took ~50 s at batch 128), so windows time stretches of whole generations.
   Whole generations instead: pass `--new-tokens N` (and no `--real-contexts`), which drops the contexts above
   (4096 tokens at batch 64 took ~4 minutes per method on the H200, compile included).

Copy bandwidth (jitted x*2 over 2 GiB) is measured first; bytes per step / bandwidth gives each point's
roofline. Writes bench/results/<name>.{json,md} and PNG plots, prints the markdown (table last). Add `--resume`
in the next device call to continue a report the time budget cut short (or to add the other workload to it):
the points it holds stay, the rest run.

On the GPU machine the embedded GGUF is carried in two parts (scripts/gpu/receive_model.sh); pass its path:

    python bench/e2e.py --workload real --model ~/sparsespec-model/SmolLM2-135M-Instruct.Q4_1.gguf --name e2e_h200_real

With `--smoke` only the output place (bench/results, name e2e_h200) is taken from here: the tiny CPU
configuration of `sparsespec bench --smoke`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The shaped workload's KV pool at 5120 tokens x 128 requests (~100 GB) plus the weights need most of the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsespec_jax.cli import main  # noqa: E402

RESULTS = Path(__file__).parent / "results"
H200 = ["--workload", "shaped", "real",
        "--shape", "qwen3-8b-shaped", "--shaped-batch", "128", "--contexts", "2048", "4096", "5120",
        "--warmup", "20", "--steps", "32", "--sync-steps", "6",
        "--prompt-length", "128", "--output-lengths", "1024", "2048", "4096", "6016",
        "--real-batch", "256", "128", "64", "--real-contexts", "7680", "4096", "2048", "--real-dtype", "bfloat16",
        "--k", "8", "--temperature", "0.6", "--copy-mib", "2048", "--attention-reps", "5",
        "--time-budget-s", "480"]
OUTPUT = ["--out", str(RESULTS), "--name", "e2e_h200"]


def configuration(user_args: list[str]) -> list[str]:
    """The flags passed to `sparsespec bench` before the user's: the H200 configuration (only the output place
    with --smoke), without its real-workload contexts when the user asks for whole generations."""
    def given(flag: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in user_args)

    if given("--smoke"):
        return OUTPUT
    if given("--new-tokens") and not given("--real-contexts"):
        start = H200.index("--real-contexts")
        end = next(i for i in range(start + 1, len(H200)) if H200[i].startswith("--"))
        return H200[:start] + H200[end:] + OUTPUT
    return H200 + OUTPUT


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        print("Configuration passed to `sparsespec bench` before your flags:\n  " + " ".join(H200 + OUTPUT) + "\n")
    sys.exit(main(["bench", *configuration(sys.argv[1:]), *sys.argv[1:]]))
