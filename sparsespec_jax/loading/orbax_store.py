"""The converted checkpoint format: our config, orbax-saved canonical params, and the tokenizer.

Restoring it skips dequantisation and layout conversion, so a model loads in about the time it takes to
read its bytes. Layout of a converted directory:

    config.json      {"format": "sparsespec-jax", "format_version": 1, "source": ..., "config": {...}}
    params/          orbax StandardCheckpointer checkpoint of {canonical name: np.ndarray}
    tokenizer.json, tokenizer_config.json   (Tokenizer.save_pretrained)

The format marker keeps this config.json from being mistaken for a Hugging Face one and vice versa.
Params are written without orbax's default zstd compression (through the PyTree handler, since
StandardCheckpointer does not expose the option): decompressing is most of the restore time (SmolLM2:
~0.7 s uncompressed vs ~2 s compressed on 2 CPU cores) while the files are only ~1.5x larger. The
result is an ordinary orbax PyTree checkpoint, restored with StandardCheckpointer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from sparsespec_jax.config import ConfigError, ModelConfig, validate_params
from sparsespec_jax.loading.errors import CheckpointError
from sparsespec_jax.tokenizer import Tokenizer, TokenizerError

FORMAT = "sparsespec-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The converted-checkpoint manifest in `directory`/config.json, or None if it is not one of ours."""
    config_file = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


def save_converted(dst_dir: str | os.PathLike, config: ModelConfig, params: dict[str, np.ndarray],
                   tokenizer: Tokenizer, source: str = "") -> Path:
    """Write a converted checkpoint atomically: into a sibling temp dir, then one rename.

    An interrupted run leaves at most a hidden temp dir, never a half-written `dst_dir`. `dst_dir` must not
    exist yet (or be an empty directory).
    """
    dst = Path(dst_dir).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination already exists and is not an empty directory")
    try:
        validate_params(config, params, f"{dst}: params to save")
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(
                {name: np.asarray(value) for name, value in params.items()}))
        tokenizer.save_pretrained(tmp)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
                    "config": json.loads(config.to_json())}
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_converted(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer, str]:
    """(config, params, tokenizer, recorded source) of a converted checkpoint directory."""
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"{directory / CONFIG_FILE}: not a converted checkpoint "
                              f"(missing or unreadable, or no \"format\": {FORMAT!r} marker)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / CONFIG_FILE}: format_version {manifest.get('format_version')!r} is "
                              f"not supported (expected {FORMAT_VERSION}); convert the checkpoint again")
    try:
        config = ModelConfig.from_json(json.dumps(manifest["config"]))
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: field 'config' is invalid ({err})") from err
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: parameter checkpoint directory is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir)
    except Exception as err:  # orbax and tensorstore raise many unrelated types for unreadable data
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(err).__name__}: {err})") from err
    params = {name: np.asarray(value) for name, value in restored.items()}
    try:
        validate_params(config, params, str(params_dir))
        tokenizer = Tokenizer.from_hf_dir(directory)
    except (ConfigError, TokenizerError) as err:
        raise CheckpointError(str(err)) from err
    return config, params, tokenizer, str(manifest.get("source", ""))
