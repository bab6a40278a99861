"""XLA GPU settings the engine's compiled steps rely on, added to XLA_FLAGS before JAX starts a backend.

The decoder layers run in a loop over stacked weights. XLA's Triton GEMM fusions do not absorb the per-layer
dynamic slice of the weight stack, so on a GPU each step first copies every layer's weights (a device memcpy:
1.7 ms of a 12.4 ms step at the Qwen3-1.7B shape, ~8 ms at Qwen3-8B). With cuBLAS GEMMs and dynamic-slice
fusion the GEMMs read each layer's weights in place. The flags only matter on GPU; other platforms ignore them.
A flag the user already set in XLA_FLAGS is left as the user set it. JAX reads XLA_FLAGS when it starts its
first backend, so this takes effect only when sparsespec_jax is imported before any JAX computation runs.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

GPU_LAYER_LOOP_FLAGS = {
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_dynamic_slice_fusion": "true",
}


def add_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Append each of GPU_LAYER_LOOP_FLAGS that XLA_FLAGS does not name yet; returns the new XLA_FLAGS."""
    current = environ.get("XLA_FLAGS", "")
    named = {word.lstrip("-").split("=", 1)[0] for word in current.split()}
    added = [f"--{name}={value}" for name, value in GPU_LAYER_LOOP_FLAGS.items() if name not in named]
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ["XLA_FLAGS"]
