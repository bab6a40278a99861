"""Read a Hugging Face model directory (config.json + safetensors, single or sharded) into canonical params.

Only safetensors are read (no pickle, no remote code). Tensors keep the checkpoint's float dtype (float32,
float16 or bfloat16 via ml_dtypes) so a bf16 model is not doubled in memory before the decoder casts it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes  # also registers the "bfloat16" numpy dtype name that safetensors' numpy reader needs
import numpy as np
from safetensors import SafetensorError, safe_open

from sparsespec_jax.config import ConfigError, ModelConfig, config_from_hf, param_shapes
from sparsespec_jax.loading.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}

# Hugging Face name (after "model.layers.N.") -> canonical parameter name.
_LAYER_TENSORS = {
    "input_layernorm.weight": "layers.attn_norm",
    "self_attn.q_proj.weight": "layers.wq",
    "self_attn.k_proj.weight": "layers.wk",
    "self_attn.v_proj.weight": "layers.wv",
    "self_attn.o_proj.weight": "layers.wo",
    "self_attn.q_proj.bias": "layers.bq",
    "self_attn.k_proj.bias": "layers.bk",
    "self_attn.v_proj.bias": "layers.bv",
    "self_attn.q_norm.weight": "layers.q_norm",
    "self_attn.k_norm.weight": "layers.k_norm",
    "post_attention_layernorm.weight": "layers.mlp_norm",
    "mlp.gate_proj.weight": "layers.w_gate",
    "mlp.up_proj.weight": "layers.w_up",
    "mlp.down_proj.weight": "layers.w_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
                   "lm_head.weight": "lm_head"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some exporters keep; recomputed from the config, never needed.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")
# torch.nn.Linear weights are (out, in); the canonical layout is (in, out).
_PROJECTIONS = {"layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up",
                "layers.w_down", "lm_head"}


def read_hf_config(directory: Path) -> ModelConfig:
    config_file = directory / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    try:
        return config_from_hf(data, source=str(config_file))
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from err


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single weights file."""
    single = directory / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    index_file = directory / INDEX_FILE
    if not index_file.exists():
        raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                              "(only safetensors checkpoints are supported)")
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file}: malformed shard index ({err!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: field 'weight_map' must be an object")
    files = {}
    for name, shard in weight_map.items():
        shard_path = directory / str(shard)
        if Path(str(shard)).name != shard or not shard_path.is_file():
            raise CheckpointError(f"{index_file}: shard {shard!r} of tensor {name!r} is not a file in {directory}")
        files[name] = shard_path
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None


def _canonical_name(hf_name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name], None
    match = _LAYER_NAME.fullmatch(hf_name)
    if match is None or int(match[1]) >= cfg.num_layers or match[2] not in _LAYER_TENSORS:
        return None
    return _LAYER_TENSORS[match[2]], int(match[1])


def _hf_name(canonical: str, layer: int | None) -> str:
    table = _GLOBAL_TENSORS if layer is None else _LAYER_TENSORS
    suffix = next(h for h, c in table.items() if c == canonical)
    return suffix if layer is None else f"model.layers.{layer}.{suffix}"


def load_hf_dir(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical parameters of a Hugging Face Llama/Qwen2/Qwen3 safetensors directory."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    shapes = param_shapes(cfg)
    by_file: dict[Path, list[str]] = {}
    for name, path in _tensor_files(directory).items():
        by_file.setdefault(path, []).append(name)

    # Check every name, shape and dtype before reading data: (canonical, layer) -> (hf name, file).
    sources: dict[tuple[str, int | None], tuple[str, Path]] = {}
    dtypes: dict[str, list[np.dtype]] = {name: [] for name in shapes}
    for path, names in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {INDEX_FILE} is missing from the shard")
                if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                target = _canonical_name(name, cfg)
                if target is None or target[0] not in shapes:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {cfg.arch} model with "
                                          f"{cfg.num_layers} layers (the architecture may not be supported)")
                canonical, layer = target
                expected = shapes[canonical][0 if layer is None else 1:]
                if canonical in _PROJECTIONS:
                    expected = expected[::-1]
                tensor = f.get_slice(name)
                if tuple(tensor.get_shape()) != expected:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.get_shape())}, "
                                          f"config.json implies {expected}")
                if tensor.get_dtype() not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.get_dtype()}; "
                                          f"supported: {sorted(_DTYPES)}")
                sources[target] = (name, path)
                dtypes[canonical].append(_DTYPES[tensor.get_dtype()])
    for canonical in shapes:
        for layer in _layers(canonical, cfg):
            if (canonical, layer) not in sources:
                raise CheckpointError(f"{directory}: missing tensor {_hf_name(canonical, layer)!r} "
                                      f"required by config.json ({cfg.arch})")

    # Layers stored in different float dtypes (rare) are stacked in float32 rather than rounded.
    params = {name: np.empty(shape, dtypes[name][0] if len(set(dtypes[name])) == 1 else np.float32)
              for name, shape in shapes.items()}
    for path in by_file:
        with _open(path) as f:
            for (canonical, layer), (name, source) in sources.items():
                if source == path:
                    tensor = f.get_tensor(name)
                    dst = params[canonical] if layer is None else params[canonical][layer]
                    dst[...] = tensor.T if canonical in _PROJECTIONS else tensor
    return cfg, params


def _layers(canonical: str, cfg: ModelConfig) -> range | list[None]:
    return range(cfg.num_layers) if canonical.startswith("layers.") else [None]
