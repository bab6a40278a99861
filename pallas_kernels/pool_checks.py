"""Argument checks shared by every kernel that reads the paged KV pool, on GPU and TPU alike."""

from __future__ import annotations


def check_queries_against_pool(q, k_pool, v_pool=None) -> int:
    """Check queries [..., Hq, D] against the pool(s) [L, Hkv, slots, D]; returns Hkv."""
    num_q_heads, head_dim = q.shape[-2:]
    if k_pool.ndim != 4:
        raise ValueError(f"k_pool must be [layers, kv_heads, slots, head_dim], got shape {k_pool.shape}")
    _, num_kv_heads, _, pool_head_dim = k_pool.shape
    if v_pool is not None and v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool shape {v_pool.shape} differs from k_pool shape {k_pool.shape}")
    if pool_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} differs from the pool's head_dim {pool_head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of pool KV heads ({num_kv_heads})")
    return num_kv_heads
