"""The GPU step flags reach XLA_FLAGS on import without overriding what the user set; quick compiles are
scoped."""

import os
import subprocess
import sys

import jax
import pytest

from sparsespec_jax.xla_flags import GPU_GRAPH_FLAGS, GPU_LAYER_LOOP_FLAGS, add_default_xla_flags, quick_compiles

ALL_FLAGS = {**GPU_LAYER_LOOP_FLAGS, **GPU_GRAPH_FLAGS}


def test_flags_are_added_to_an_empty_environment():
    environ = {}
    flags = add_default_xla_flags(environ).split()
    assert flags == [f"--{name}={value}" for name, value in ALL_FLAGS.items()]


def test_a_flag_the_user_set_is_kept_and_others_still_added():
    environ = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x"}
    flags = add_default_xla_flags(environ).split()
    assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags
    assert "--xla_dump_to=/tmp/x" in flags and "--xla_gpu_enable_dynamic_slice_fusion=true" in flags
    assert add_default_xla_flags(environ).split() == flags          # idempotent


def test_cuda_graphs_can_be_left_out_and_a_bad_switch_is_named():
    flags = add_default_xla_flags({"SPARSESPEC_CUDA_GRAPHS": "0"}).split()
    assert flags == [f"--{name}={value}" for name, value in GPU_LAYER_LOOP_FLAGS.items()]
    with pytest.raises(ValueError, match="SPARSESPEC_CUDA_GRAPHS: must be 0 or 1, got 'no'"):
        add_default_xla_flags({"SPARSESPEC_CUDA_GRAPHS": "no"})


def test_import_sets_the_flags_before_jax_starts_and_xla_accepts_them():
    environ = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "SPARSESPEC_CUDA_GRAPHS")}
    script = ("import os, sparsespec_jax, jax.numpy as jnp; "
              "print(os.environ['XLA_FLAGS']); print(float(jnp.arange(4.0).sum()))")
    result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    flags_line, total = result.stdout.split("\n")[:2]
    assert set(flags_line.split()) == {f"--{n}={v}" for n, v in ALL_FLAGS.items()}
    assert total == "6.0"


def test_quick_compiles_hold_only_inside_and_survive_an_error():
    setting = lambda: jax.config.values["jax_disable_most_optimizations"]
    before = setting()
    with pytest.raises(RuntimeError, match="inside"):
        with quick_compiles():
            assert setting() is True
            raise RuntimeError("inside")
    assert setting() == before
