"""Load a model (config, canonical params, tokenizer) from a registry name, GGUF file or directory.

Every source ends up as the same `LoadedModel`: `params` follow `sparsespec_jax.config.param_shapes`.
Registry models are converted once and cached (orbax), so later loads skip dequantisation.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from sparsespec_jax.config import ModelConfig
from sparsespec_jax.loading.errors import CheckpointError
from sparsespec_jax.loading.gguf_loader import GGUF_MAGIC, load_gguf
from sparsespec_jax.loading.hf_loader import load_hf_dir
from sparsespec_jax.loading.orbax_store import load_converted, read_manifest, save_converted
from sparsespec_jax.loading.registry import DEFAULT_MODEL, RegistryEntry, checkpoint_home, lookup
from sparsespec_jax.tokenizer import Tokenizer, TokenizerError

__all__ = ["DEFAULT_MODEL", "CheckpointError", "LoadedModel", "convert_checkpoint", "load_model"]


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer: Tokenizer
    source: str


def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, use_cache: bool = True) -> LoadedModel:
    """Load `model`: an existing path (.gguf file, Hugging Face or converted directory) or a registry name.

    A registry model is restored from its converted cache when that is present and up to date; otherwise
    its source is loaded and, with `use_cache`, the cache is written for the next run.
    """
    path = Path(model)
    if path.exists():
        return _load_path(path)
    if not isinstance(model, str):
        raise CheckpointError(f"{path}: no such file or directory")
    return _load_registered(lookup(model), use_cache)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write `src` (anything `load_model` accepts) as a converted checkpoint directory `dst`."""
    loaded = load_model(src)
    return save_converted(dst, loaded.config, loaded.params, loaded.tokenizer, source=loaded.source)


def _load_path(path: Path) -> LoadedModel:
    path = path.absolute()
    if path.is_dir():
        if read_manifest(path) is not None:
            config, params, tokenizer, _ = load_converted(path)
            return LoadedModel(config, params, tokenizer, f"converted:{path}")
        config, params = load_hf_dir(path)
        return LoadedModel(config, params, _tokenizer(Tokenizer.from_hf_dir, path), f"hf:{path}")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC and path.suffix != ".gguf":
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}); give a .gguf file, a Hugging Face "
                              "model directory or a converted checkpoint directory")
    config, params = load_gguf(path)
    return LoadedModel(config, params, _tokenizer(Tokenizer.from_gguf, path), f"gguf:{path}")


def _tokenizer(read, path: Path) -> Tokenizer:
    try:
        return read(path)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from err


def _load_registered(entry: RegistryEntry, use_cache: bool) -> LoadedModel:
    name = f"{entry.name} ({entry.describe_source()})"
    cache = checkpoint_home() / entry.name
    if use_cache and entry.format != "converted" and _cache_is_current(cache, entry):
        config, params, tokenizer, _ = load_converted(cache)
        return LoadedModel(config, params, tokenizer, f"{name} from cache {cache}")
    source = entry.locate()
    loaded = _load_path(source)
    found_format = loaded.source.partition(":")[0]
    if found_format != entry.format:
        raise CheckpointError(f"registry entry {entry.name!r}: field 'format' is {entry.format!r} but {source} "
                              f"is a {found_format!r} checkpoint")
    if use_cache and entry.format != "converted":
        _write_cache(cache, loaded, entry)
    return dataclasses.replace(loaded, source=f"{name} from {loaded.source}")


def _cache_is_current(cache: Path, entry: RegistryEntry) -> bool:
    manifest = read_manifest(cache)
    return manifest is not None and manifest.get("source") == entry.describe_source()


def _write_cache(cache: Path, loaded: LoadedModel, entry: RegistryEntry) -> None:
    """Replace a missing or stale cache; a failure to write only costs speed next time, so it warns."""
    if _cache_is_current(cache, entry):       # a concurrent run published it while this one converted
        return
    if cache.exists():
        if read_manifest(cache) is None and (not cache.is_dir() or any(cache.iterdir())):
            raise CheckpointError(f"{cache}: cache location of {entry.name!r} holds something that is not a "
                                  "converted checkpoint; remove it or set SPARSESPEC_CHECKPOINT_DIR elsewhere")
        shutil.rmtree(cache)
    try:
        save_converted(cache, loaded.config, loaded.params, loaded.tokenizer, source=entry.describe_source())
    except (OSError, CheckpointError) as err:
        if _cache_is_current(cache, entry):  # a concurrent run published the same cache first
            return
        if isinstance(err, CheckpointError):
            raise
        warnings.warn(f"{cache}: could not write the converted cache ({err}); the next load converts again",
                      stacklevel=3)
