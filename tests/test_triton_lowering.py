"""Every Pallas GPU kernel lowers to Triton IR for an H100/H200 (sm_90) on a machine without a GPU.

The interpret-mode tests check what the kernels compute; this checks that the real lowering path (Pallas to
Triton IR, the step before Triton's own compiler and ptxas) accepts them, so a construct the Triton lowering
does not support fails in CI rather than on the GPU. The kernels are exported for CUDA from abstract shapes;
Pallas asks the local GPU for its compute capability, so the test supplies one.
"""

import functools
import types

import jax
import jax.numpy as jnp
import pytest
from jax import export

import jax._src.pallas.triton.pallas_call_registration as triton_registration
from pallas_kernels.paged_attention import ragged_paged_attention
from pallas_kernels.pillar_scores import pillar_scores_paged
from pallas_kernels.sparse_attention import sparse_decode_attention
from pallas_kernels.topk_select import topk_select
from pallas_kernels.unified_attention import unified_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
ROWS, DRAFT_ROWS, TOKENS, HQ, HKV, D, LAYERS, PAGE, PAGES, BUDGET = 3, 4, 12, 8, 2, 64, 2, 16, 8, 24
POOL_SLOTS = ROWS * PAGES * PAGE


def spec(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


def attention_args(kv_dtype):
    return dict(q=spec((TOKENS, HQ, D), kv_dtype), k_pool=spec((LAYERS, HKV, POOL_SLOTS, D), kv_dtype),
                v_pool=spec((LAYERS, HKV, POOL_SLOTS, D), kv_dtype), layer=spec(()))


def ragged_args():
    return dict(q_start=spec((ROWS,)), q_len=spec((ROWS,)), kv_len=spec((ROWS,)), page_tables=spec((ROWS, PAGES)))


def cases(kv_dtype):
    paged = dict(page_size=PAGE, max_q_len=9)
    full, sparse = ragged_args(), dict(slot_ids=spec((DRAFT_ROWS, HKV, BUDGET)), count=spec((DRAFT_ROWS,)))
    attention = attention_args(kv_dtype)
    draft_q = dict(attention, q=spec((DRAFT_ROWS, HQ, D), kv_dtype))
    mixed_q = dict(attention, q=spec((DRAFT_ROWS + TOKENS, HQ, D), kv_dtype))
    scores_args = dict(q=spec((LAYERS, TOKENS, HQ, D), kv_dtype), k_pool=attention["k_pool"], layers=spec((LAYERS,)))
    return {
        "ragged_paged_attention": (functools.partial(ragged_paged_attention, **paged), {**attention, **full}),
        "sparse_decode_attention": (sparse_decode_attention, {**draft_q, **sparse}),
        "unified_attention": (functools.partial(unified_attention, **paged), {**mixed_q, **sparse, **full}),
        "pillar_scores_paged": (functools.partial(pillar_scores_paged, **paged),
                                {**scores_args, **full, "lse": spec((LAYERS, TOKENS, HQ), jnp.float32)}),
        "topk_select": (functools.partial(topk_select, max_k=BUDGET, max_resident=64),
                        dict(scores=spec((ROWS, HKV, 300), jnp.float32), k=spec((ROWS,)))),
    }


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setattr(triton_registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability="9.0"))


@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(cases(jnp.float32)))
def test_kernel_lowers_to_triton_for_sm90(sm90, name, kv_dtype):
    kernel, args = cases(kv_dtype)[name]
    names = list(args)
    exported = export.export(jax.jit(lambda *values: kernel(**dict(zip(names, values)))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args.values())
    module = exported.mlir_module()
    assert TRITON_CALL in module and f'name = "{name}"' in module
