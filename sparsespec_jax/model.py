"""One decoder for the Llama and Qwen families, as a Flax NNX module over a paged KV cache.

Per-layer weights are stacked on a leading layer axis and run with lax.scan, so compile time does not grow
with depth. Projections that read the same input run as one GEMM over fused weights (q/k/v, gate/up). The KV
cache lives outside the module and is threaded through the scan; attention is supplied by the caller (vanilla,
draft or verify flavour) so one decoder serves every step kind.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsespec_jax.config import ModelConfig, param_shapes, validate_params
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.rope import apply_rope, inverse_frequencies, rotations
from sparsespec_jax.sharding import TP_AXIS, constrain, gathered_logits, mesh_of

LAYER_PREFIX = "layers."

# attend(q [N, Hq, D], k_pool, v_pool, layer) -> (out [N, Hq, D], per-layer outputs pytree).
# Outputs should not read the pool: nothing would order that read before the next layer's in-place write,
# and XLA would copy the whole pool to keep it. Inputs the attention needs per layer are best captured whole
# and indexed by `layer` where they are used (as the pools are): a per-layer slice taken in the loop costs a
# copy kernel per layer on a GPU (see Transformer).
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

NORM_NAMES = ("attn_norm", "mlp_norm", "q_norm", "k_norm")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def fuse_projections(cfg: ModelConfig, layers: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The stacked layer weights with wq/wk/wv fused into wqkv [L, D, Hkv, (G+2)*Dh] (per KV head: its G query
    heads, its K head, its V head), w_gate/w_up into w_gate_up [L, D, 2, F], and the norm vectors (attn_norm,
    mlp_norm, then q_norm and k_norm where present) laid end to end in norms [L, 2*D (+ 2*Dh)].

    Why: one GEMM per fused weight fills a GPU better at a few hundred tokens than two or three small ones, and
    left to itself XLA merges the q/k/v GEMMs anyway, by copying the three weights into one on every step
    (~0.8 ms of a Qwen3-8B step on an H200). Fused here, that step's kernels took 14.7 ms instead of 15.6.
    Grouping by KV head keeps each tensor-parallel device's query, key and value columns together, so the fused
    weight splits over KV heads the way the separate ones split over their heads.
    The norms are packed because, in the layer loop on a GPU, each small per-layer slice became a copy kernel
    of its own (with the dynamic-slice fusion of xla_flags.py): one vector per layer instead of two or four.
    """
    L, D = cfg.num_layers, cfg.hidden_size
    hkv, dh = cfg.num_kv_heads, cfg.head_dim
    group = cfg.num_heads // hkv
    fused = {name: w for name, w in layers.items()
             if name not in ("wq", "wk", "wv", "w_gate", "w_up") + NORM_NAMES}
    wqkv = jnp.concatenate([layers["wq"].reshape(L, D, hkv, group * dh), layers["wk"].reshape(L, D, hkv, dh),
                            layers["wv"].reshape(L, D, hkv, dh)], axis=3)
    w_gate_up = jnp.stack([layers["w_gate"], layers["w_up"]], axis=2)
    mesh = mesh_of(layers["wq"])
    if mesh is not None:
        wqkv = constrain(wqkv, mesh, None, None, TP_AXIS, None)
        intermediate_split = not _replicated(layers["w_gate"])      # replicated where F does not split evenly
        w_gate_up = constrain(w_gate_up, mesh, None, None, None, TP_AXIS if intermediate_split else None)
    fused["wqkv"], fused["w_gate_up"] = wqkv, w_gate_up
    fused["norms"] = jnp.concatenate([layers[name] for name in NORM_NAMES if name in layers], axis=1)
    return fused


def _replicated(x: jax.Array) -> bool:
    return all(axis is None for axis in x.sharding.spec)


class LayerStack(nnx.Module):
    """All decoder layers' weights, each stacked over layers: [L, ...]."""

    def __init__(self, weights: Mapping[str, jax.Array]):
        self.names = tuple(sorted(weights))
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], dtype=jnp.float32, unroll_layers: bool = False):
        """unroll_layers: trace every layer into the program instead of a loop over stacked weights, at about
        5x the compile time per step shape. In the loop, a GPU reads each layer's weight slice in place only
        with the XLA flags of xla_flags.py (set on import); without them it copies the whole weight stack
        every step (~8 ms at the Qwen3-8B shape on an H200), which unrolled layers also avoid."""
        validate_params(cfg, params, source="model parameters")
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.unroll_layers = unroll_layers
        cast = lambda a: jnp.asarray(a, dtype=self.dtype)
        self.embed = nnx.Param(cast(params["embed"]))
        self.final_norm = nnx.Param(cast(params["final_norm"]))
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(cast(params["lm_head"]))
        self.layers = LayerStack(fuse_projections(cfg, {name[len(LAYER_PREFIX):]: cast(value)
                                                        for name, value in params.items()
                                                        if name.startswith(LAYER_PREFIX)}))

    def matmul_precision(self):
        """float32 weights get true float32 matmuls: TF32 (the GPU default) rounds differently for different
        token counts, which would let a k+1-token verify disagree with one-token decoding on near-ties."""
        return jax.default_matmul_precision("highest" if self.dtype == jnp.float32 else "default")

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVCache, write_slots: jax.Array,
                 attend: AttendFn):
        """Run the flat token batch through all layers: (final hidden [N, D], kv, stacked per-layer outputs)."""
        with self.matmul_precision():
            return self._forward(tokens, positions, kv, write_slots, attend)

    def _forward(self, tokens, positions, kv: KVCache, write_slots, attend: AttendFn):
        cfg = self.cfg
        n = tokens.shape[0]
        d, hkv, dh = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
        group = cfg.num_heads // hkv
        cos, sin = rotations(positions, jnp.asarray(inverse_frequencies(cfg), jnp.float32))
        x = self.embed[...][tokens]

        # The layer index rides in the carry: taken from a stacked range, it too would be a per-layer copy.
        def layer(carry, w):
            x, k_pool, v_pool, layer_index = carry
            norms = w["norms"]
            h = rms_norm(x, norms[:d], cfg.rms_norm_eps)
            qkv = jnp.einsum("nd,dhe->nhe", h, w["wqkv"]).reshape(n, hkv, group + 2, dh)
            q, k, v = qkv[:, :, :group].reshape(n, cfg.num_heads, dh), qkv[:, :, group], qkv[:, :, group + 1]
            if cfg.attention_bias:
                q = q + w["bq"].reshape(cfg.num_heads, dh)
                k, v = k + w["bk"].reshape(hkv, dh), v + w["bv"].reshape(hkv, dh)
            if cfg.qk_norm:
                q = rms_norm(q, norms[2 * d:2 * d + dh], cfg.rms_norm_eps)
                k = rms_norm(k, norms[2 * d + dh:], cfg.rms_norm_eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            k_pool = k_pool.at[layer_index, :, write_slots].set(k.astype(k_pool.dtype))
            v_pool = v_pool.at[layer_index, :, write_slots].set(v.astype(v_pool.dtype))
            attn, outputs = attend(q, k_pool, v_pool, layer_index)
            x = x + attn.reshape(n, -1).astype(x.dtype) @ w["wo"]
            h = rms_norm(x, norms[d:2 * d], cfg.rms_norm_eps)
            gate_up = jnp.einsum("nd,dcf->ncf", h, w["w_gate_up"])
            x = x + (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ w["w_down"]
            return (x, k_pool, v_pool, layer_index + 1), outputs

        (x, k_pool, v_pool, _), outputs = jax.lax.scan(layer, (x, kv.k, kv.v, jnp.int32(0)), self.layers.arrays(),
                                                       unroll=cfg.num_layers if self.unroll_layers else 1)
        hidden = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return hidden, KVCache(k=k_pool, v=v_pool, page_size=kv.page_size), outputs

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits in float32 for hidden states [..., D]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        with self.matmul_precision():
            logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
        return gathered_logits(logits, mesh_of(head))


def random_params(cfg: ModelConfig, seed: int, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
    """Random weights of the right shapes (benchmarks of large configurations); norms start at one."""
    key = jax.random.key(seed)
    params = {}
    for i, (name, shape) in enumerate(sorted(param_shapes(cfg).items())):
        if name.endswith("norm"):
            params[name] = jnp.ones(shape, dtype)
        else:
            fan_in = shape[-2] if len(shape) >= 2 and name != "embed" else shape[-1]
            params[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                            * fan_in ** -0.5).astype(dtype)
    return params


def forward_tokens(cfg: ModelConfig, params: Mapping[str, Any], token_ids, dtype=jnp.float32,
                   page_size: int = 16) -> np.ndarray:
    """Logits [T, V] of one token sequence through the engine's decoder and paged attention (for checks)."""
    from sparsespec_jax.attention import AttentionMetadata, paged_attention

    token_ids = np.asarray(token_ids, np.int32)
    num_tokens = len(token_ids)
    num_pages = -(-num_tokens // page_size)
    model = Transformer(cfg, params, dtype)
    kv = KVCache.create(cfg, num_pages + 1, page_size, dtype)
    page_table = np.arange(1, num_pages + 1, dtype=np.int32)[None, :]
    positions = np.arange(num_tokens, dtype=np.int32)
    meta = AttentionMetadata(
        q_start=jnp.zeros(1, jnp.int32), q_len=jnp.full(1, num_tokens, jnp.int32),
        kv_len=jnp.full(1, num_tokens, jnp.int32), page_tables=jnp.asarray(page_table),
        write_slots=jnp.asarray(page_table[0, positions // page_size] * page_size + positions % page_size),
        page_size=page_size, max_q_len=num_tokens)

    def attend(q, k_pool, v_pool, layer):
        out, _ = paged_attention("reference", q, k_pool, v_pool, layer, meta)
        return out, None

    hidden, _, _ = model(jnp.asarray(token_ids), jnp.asarray(positions), kv, meta.write_slots, attend)
    return np.asarray(model.logits(hidden))
