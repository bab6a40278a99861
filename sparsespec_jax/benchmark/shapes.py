"""Paper-scale model configurations for random-weight runs, and the tokenizer such runs need.

Random weights make kernels, scheduling and KV traffic real without model files on the device; acceptance is
not meaningful for them (see SpecConfig.replay_acceptance).
"""

from __future__ import annotations

import tokenizers

from sparsespec_jax.config import ModelConfig
from sparsespec_jax.tokenizer import Tokenizer

QWEN3_1_7B = ModelConfig(arch="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
                         num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
                         eos_token_ids=(151645,))
QWEN3_8B = ModelConfig(arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960,
                       eos_token_ids=(151645,))
# SmolLM2-135M-Instruct's configuration, for systems measurements that replay acceptance anyway and so need
# its shape, not its weights.
SMOLLM2_135M = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                           tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                           eos_token_ids=(2,))
SHAPES = {"qwen3-1.7b-shaped": QWEN3_1_7B, "qwen3-8b-shaped": QWEN3_8B, "smollm2-shaped": SMOLLM2_135M}


def placeholder_tokenizer() -> Tokenizer:
    """A word-level tokenizer with a few words, for random-weight runs that never look at text (ids past its
    vocabulary decode to nothing)."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", "the", "a", "step"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return Tokenizer(backend, bos_token=None, eos_token="<eos>", chat_template=None, source="placeholder")
