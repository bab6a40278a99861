"""Loaded checkpoints compute what their source tensors define, checked with the numpy reference forward.

- SmolLM2 (GGUF): greedy continuation of a capitals prompt is " Rome"; the loader's un-permuted Q/K with
  rotate-half RoPE equals the file's raw Q/K with interleaved RoPE (so the un-permutation is verified
  without assuming it).
- Tiny random Llama 3 / Qwen2 / Qwen3 checkpoints in Hugging Face layout match the forward of their
  tensors mapped by the test itself.
- The engine's JAX decoder (sparsespec_jax.model.forward_tokens) matches the numpy forward.
"""

from __future__ import annotations

import dataclasses

import gguf
import ml_dtypes
import numpy as np
import pytest

from numpy_forward import forward, relative_error
from sparsespec_jax.loading.gguf_loader import load_gguf
from sparsespec_jax.loading.hf_loader import load_hf_dir
from sparsespec_jax.tokenizer import Tokenizer
from test_loading import (SMOLLM2_GGUF, TINY_EXPECTED_CONFIGS, TINY_HF_CONFIGS, canonical_from_hf,
                          tiny_hf_model)

TOLERANCE = 1e-4
CAPITALS_PROMPT = ("The capital of France is Paris. The capital of Germany is Berlin. "
                   "The capital of Italy is")
TINY_VARIANTS = [("llama", {"shards": 2}), ("qwen2", {"dtype": ml_dtypes.bfloat16}), ("qwen3", {})]


def tiny_prompt(vocab_size: int, length: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, length)


@pytest.fixture(scope="module")
def smollm2():
    """Loaded SmolLM2, its prompt tokens and the float64 reference logits of the prompt."""
    config, params = load_gguf(SMOLLM2_GGUF)
    tokenizer = Tokenizer.from_gguf(SMOLLM2_GGUF)
    tokens = tokenizer.encode(CAPITALS_PROMPT)
    return config, params, tokenizer, tokens, forward(config, params, tokens)


@pytest.mark.slow
def test_smollm2_greedy_continuation_is_rome(smollm2):
    config, params, tokenizer, tokens, logits = smollm2
    first = int(np.argmax(logits[-1]))
    second = int(np.argmax(forward(config, params, tokens + [first])[-1]))
    assert tokenizer.decode([first, second]).startswith(" Rome")


@pytest.mark.slow
def test_smollm2_unpermuted_q_k_equal_raw_weights_with_interleaved_rope(smollm2):
    config, params, _, tokens, logits = smollm2
    # Canonical params straight from the gguf package's reader: (out, in) -> (in, out), Q/K rows untouched.
    reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    names = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate",
             "ffn_up": "w_up", "ffn_down": "w_down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
    raw_params = {"embed": raw["token_embd.weight"], "final_norm": raw["output_norm.weight"]}
    for gguf_name, canonical in names.items():
        stacked = [raw[f"blk.{i}.{gguf_name}.weight"] for i in range(config.num_layers)]
        raw_params[f"layers.{canonical}"] = np.stack([w.T if w.ndim == 2 else w for w in stacked])
    interleaved = forward(config, raw_params, tokens, rope_layout="interleaved")
    assert relative_error(logits, interleaved) <= TOLERANCE
    # The check has teeth: rotate-half RoPE on the raw (permuted) weights is far off.
    assert relative_error(forward(config, raw_params, tokens[:6]), logits[:6]) > 1e-2


@pytest.mark.parametrize("kind, options", TINY_VARIANTS)
def test_tiny_hf_checkpoint_matches_forward_of_its_tensors(tmp_path, kind, options):
    directory, tensors = tiny_hf_model(tmp_path, kind, seed=11, **options)
    stored = {name: value.astype(options.get("dtype", np.float32)) for name, value in tensors.items()}
    reference = forward(TINY_EXPECTED_CONFIGS[kind], canonical_from_hf(TINY_HF_CONFIGS[kind], stored),
                        tiny_prompt(TINY_HF_CONFIGS[kind]["vocab_size"]), dtype=np.float32)
    config, params = load_hf_dir(directory)
    loaded = forward(config, params, tiny_prompt(config.vocab_size), dtype=np.float32)
    assert relative_error(loaded, reference) <= TOLERANCE


def test_llama3_rope_scaling_changes_the_tiny_llama_logits(tmp_path):
    """Guards the test above: with original_max_position_embeddings=64 all three frequency bands occur."""
    _, tensors = tiny_hf_model(tmp_path, "llama", seed=11)
    config = TINY_EXPECTED_CONFIGS["llama"]
    params = canonical_from_hf(TINY_HF_CONFIGS["llama"], tensors)
    tokens = tiny_prompt(config.vocab_size)
    unscaled = forward(dataclasses.replace(config, rope_scaling=None), params, tokens)
    assert relative_error(unscaled, forward(config, params, tokens)) > 1e-3


# ------------------------------------------------------------------------------------------------ JAX decoder

@pytest.mark.parametrize("kind, options", TINY_VARIANTS)
def test_jax_decoder_matches_numpy_on_tiny_models(tmp_path, kind, options):
    model = pytest.importorskip("sparsespec_jax.model")
    directory, _ = tiny_hf_model(tmp_path, kind, seed=12, **options)
    config, params = load_hf_dir(directory)
    tokens = tiny_prompt(config.vocab_size, length=37, seed=1)
    jax_logits = model.forward_tokens(config, params, tokens)
    assert jax_logits.shape == (len(tokens), config.vocab_size)
    assert relative_error(jax_logits, forward(config, params, tokens)) <= TOLERANCE


@pytest.mark.slow
def test_jax_decoder_matches_numpy_on_smollm2(smollm2):
    model = pytest.importorskip("sparsespec_jax.model")
    config, params, _, tokens, logits = smollm2
    assert relative_error(model.forward_tokens(config, params, tokens), logits) <= TOLERANCE
