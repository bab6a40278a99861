"""XLA settings: the GPU flags the engine's compiled steps rely on, added to XLA_FLAGS before JAX starts a
backend, and quick compiles for runs of tiny models.

Layer loop. The decoder layers run in a loop over stacked weights. XLA's Triton GEMM fusions do not absorb the
per-layer dynamic slice of the weight stack, so on a GPU each step first copies every layer's weights (a device
memcpy: 1.7 ms of a 12.4 ms step at the Qwen3-1.7B shape, ~8 ms at Qwen3-8B). With cuBLAS GEMMs and
dynamic-slice fusion the GEMMs read each layer's weights in place.

CUDA graphs. A step launches ~700-900 kernels; launched one by one they cost the host ~2 ms per step. XLA's
command buffers record them as CUDA graphs, with the layer loop unrolled into the graph, and on each call
re-record only the commands whose buffers moved. SKIP_TEMP keeps temporaries at fixed addresses (XLA then uses
its VMM allocator), so in steady state only the few commands that read the step's packed arguments are
re-recorded; the step's outputs live in donated state for the same reason (slot_state.py). Measured on an H200
(SmolLM2 shape, batch 256, context 4096): time inside the jitted call 1.7-2.0 -> 0.75 ms for both vanilla and
pillar steps. SPARSESPEC_CUDA_GRAPHS=0 leaves these flags out.

The flags only matter on GPU; other platforms ignore them. A flag the user already set in XLA_FLAGS is left as
the user set it. JAX reads XLA_FLAGS when it starts its first backend, so this takes effect only when
sparsespec_jax is imported before any JAX computation runs.

Quick compiles. On a CPU a tiny model's step compiles for seconds and runs for milliseconds; with most XLA
optimizations off it compiles ~25% faster (the CPU smoke benchmark: 91 -> 67 s). A real model's steps then run
slower than that saves (SmolLM2 on a 2-core CPU: 1.7x), so this is only for tiny models.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

GPU_LAYER_LOOP_FLAGS = {
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_dynamic_slice_fusion": "true",
}
GPU_GRAPH_FLAGS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
    "xla_gpu_command_buffer_unroll_loops": "true",
    "xla_gpu_command_buffer_update_mode": "SKIP_TEMP",
}


def default_flags(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The flags to add: the layer-loop ones, and the CUDA-graph ones unless SPARSESPEC_CUDA_GRAPHS=0."""
    graphs = environ.get("SPARSESPEC_CUDA_GRAPHS", "1")
    if graphs not in ("0", "1"):
        raise ValueError(f"SPARSESPEC_CUDA_GRAPHS: must be 0 or 1, got {graphs!r}")
    return {**GPU_LAYER_LOOP_FLAGS, **(GPU_GRAPH_FLAGS if graphs == "1" else {})}


def add_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Append each of default_flags() that XLA_FLAGS does not name yet; returns the new XLA_FLAGS."""
    current = environ.get("XLA_FLAGS", "")
    named = {word.lstrip("-").split("=", 1)[0] for word in current.split()}
    added = [f"--{name}={value}" for name, value in default_flags(environ).items() if name not in named]
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ["XLA_FLAGS"]


@contextlib.contextmanager
def quick_compiles() -> Iterator[None]:
    """Programs compiled inside are compiled with most XLA optimizations off; the setting is restored after."""
    import jax

    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
