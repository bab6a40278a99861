"""The GPU layer-loop flags reach XLA_FLAGS on import without overriding what the user set."""

import os
import subprocess
import sys

from sparsespec_jax.xla_flags import GPU_LAYER_LOOP_FLAGS, add_default_xla_flags


def test_flags_are_added_to_an_empty_environment():
    environ = {}
    flags = add_default_xla_flags(environ).split()
    assert flags == [f"--{name}={value}" for name, value in GPU_LAYER_LOOP_FLAGS.items()]


def test_a_flag_the_user_set_is_kept_and_others_still_added():
    environ = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x"}
    flags = add_default_xla_flags(environ).split()
    assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags
    assert "--xla_dump_to=/tmp/x" in flags and "--xla_gpu_enable_dynamic_slice_fusion=true" in flags
    assert add_default_xla_flags(environ).split() == flags          # idempotent


def test_import_sets_the_flags_before_jax_starts_and_xla_accepts_them():
    environ = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    script = ("import os, sparsespec_jax, jax.numpy as jnp; "
              "print(os.environ['XLA_FLAGS']); print(float(jnp.arange(4.0).sum()))")
    result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    flags_line, total = result.stdout.split("\n")[:2]
    assert set(flags_line.split()) == {f"--{n}={v}" for n, v in GPU_LAYER_LOOP_FLAGS.items()}
    assert total == "6.0"
