"""Logit parity with Hugging Face transformers for checkpoints that transformers itself writes.

Builds tiny random Qwen3, Qwen2 and Llama (Llama 3 rope scaling) models with transformers 5 in float32,
saves them with `save_pretrained`, loads each directory with `sparsespec_jax.loading.load_model` and
compares `sparsespec_jax.model.forward_tokens` on a random 64-token prompt with the transformers forward.
Prints a table; exits 1 when any model's relative error max|a-b|/max|b| exceeds 1e-4.

Needs torch and transformers>=5 next to the project's dependencies (the GPU machine has them).
Run from the repository root:  PYTHONPATH=. python bench/transformers_parity.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sparsespec_jax.loading import load_model
from sparsespec_jax.model import forward_tokens

TOLERANCE = 1e-4
PROMPT_LENGTH = 64
SEED = 0

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, attn_implementation="eager")

MODELS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=24, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    # original_max_position_embeddings=64 puts head_dim 32's frequencies in all three Llama 3 bands.
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(head_dim=32, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale activations (the default 0.02 init leaves logits nearly constant)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer (words t<i>) so that load_model finds a complete model directory."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def check(name: str, workdir: Path) -> tuple[float, float, bool]:
    config_class, model_class, extra = MODELS[name]
    config = config_class(**COMMON, **extra)
    torch.manual_seed(SEED)
    model = model_class(config).to(torch.float32).eval()
    randomize(model, SEED)
    directory = workdir / name
    model.save_pretrained(directory)
    write_tokenizer(directory, config.vocab_size)

    tokens = np.random.default_rng(SEED).integers(0, config.vocab_size, PROMPT_LENGTH)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(tokens[None])).logits[0].numpy().astype(np.float64)
    loaded = load_model(directory)
    actual = np.asarray(forward_tokens(loaded.config, loaded.params, tokens), np.float64)
    max_abs = float(np.max(np.abs(actual - expected)))
    relative = max_abs / float(np.max(np.abs(expected)))
    return max_abs, relative, relative <= TOLERANCE


def main() -> int:
    # Compare exact float32 arithmetic on both sides: no TF32 in either framework.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__} "
          f"({jax.default_backend()}); {PROMPT_LENGTH}-token prompt, tolerance {TOLERANCE:g}")
    print(f"{'model':<8} {'max |diff|':>12} {'relative':>12}  result")
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        for name in MODELS:
            max_abs, relative, ok = check(name, Path(workdir))
            failures += not ok
            print(f"{name:<8} {max_abs:>12.3e} {relative:>12.3e}  {'ok' if ok else 'MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
