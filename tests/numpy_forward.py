"""Reference decoder forward in plain numpy (float64 by default), written independently of the engine.

Used by the loading tests as ground truth: one token sequence, full causal attention, no cache.
`rope_layout="interleaved"` rotates adjacent element pairs (ggml's llama convention) so the raw, still
permuted Q/K weights of a llama GGUF can be checked without trusting the loader's un-permutation.
"""

from __future__ import annotations

import math

import numpy as np

from sparsespec_jax.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequency of each rotated pair [head_dim // 2], with Llama 3 band-wise scaling."""
    half = cfg.head_dim // 2
    freqs = np.array([cfg.rope_theta ** (-2.0 * i / cfg.head_dim) for i in range(half)])
    scaling = cfg.rope_scaling
    if scaling is None:
        return freqs
    original = scaling.original_max_position_embeddings
    for i, freq in enumerate(freqs):
        wavelength = 2 * math.pi / freq
        if wavelength < original / scaling.high_freq_factor:
            continue  # high frequencies: unchanged
        if wavelength > original / scaling.low_freq_factor:
            freqs[i] = freq / scaling.factor  # low frequencies: fully slowed down
        else:
            blend = (original / wavelength - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            freqs[i] = blend * freq + (1 - blend) * freq / scaling.factor
    return freqs


def rotate(x: np.ndarray, freqs: np.ndarray, layout: str) -> np.ndarray:
    """Apply RoPE to x [T, H, head_dim] at positions 0..T-1."""
    angles = np.arange(x.shape[0])[:, None] * freqs[None, :]  # [T, head_dim // 2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    if layout == "rotate_half":
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out
    raise ValueError(f"rope layout {layout!r}: expected 'rotate_half' or 'interleaved'")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def forward(cfg: ModelConfig, params: dict, token_ids, rope_layout: str = "rotate_half",
            dtype=np.float64) -> np.ndarray:
    """Logits [T, V] for one sequence, from canonical params ((in, out) projections stacked over layers)."""
    tokens = np.asarray(token_ids)
    T, H, KV, hd = len(tokens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    freqs = rope_frequencies(cfg)
    causal = np.tril(np.ones((T, T), bool))
    x = np.asarray(params["embed"])[tokens].astype(dtype)
    for layer in range(cfg.num_layers):
        # Cast one layer at a time: a float64 copy of a whole real model would not fit comfortably.
        w = {name[len("layers."):]: np.asarray(value[layer]).astype(dtype)
             for name, value in params.items() if name.startswith("layers.")}
        h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
        if cfg.attention_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q, k, v = q.reshape(T, H, hd), k.reshape(T, KV, hd), v.reshape(T, KV, hd)
        if cfg.qk_norm:
            q, k = rms_norm(q, w["q_norm"], cfg.rms_norm_eps), rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q, k = rotate(q, freqs, rope_layout), rotate(k, freqs, rope_layout)
        heads = []
        for head in range(H):
            kv_head = head // (H // KV)
            scores = q[:, head] @ k[:, kv_head].T / math.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            heads.append(probs @ v[:, kv_head])
        x = x + np.concatenate(heads, axis=-1) @ w["wo"]
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        x = x + (silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
    x = rms_norm(x, np.asarray(params["final_norm"]).astype(dtype), cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return x @ np.asarray(head).astype(dtype)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: one number that is scale-free across models."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
