"""Read llama.cpp GGUF files into a ModelConfig and canonical float32 parameters.

The header is parsed here with a sequential reader instead of gguf.GGUFReader: the reader builds a numpy
view for every element of the ~100k-entry tokenizer arrays, which alone takes about five seconds for
SmolLM2, while a plain sequential parse takes a fraction of a second. Dequantisation uses gguf.quants, so
every ggml type that package knows is supported.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from sparsespec_jax.config import ConfigError, ModelConfig, param_shapes
from sparsespec_jax.loading.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_STRING_LENGTH_BYTES = 8

# GGUF tensor name (per layer: after "blk.N.") -> canonical parameter name.
_LAYER_TENSORS = {
    "attn_norm.weight": "layers.attn_norm",
    "attn_q.weight": "layers.wq",
    "attn_k.weight": "layers.wk",
    "attn_v.weight": "layers.wv",
    "attn_output.weight": "layers.wo",
    "attn_q.bias": "layers.bq",
    "attn_k.bias": "layers.bk",
    "attn_v.bias": "layers.bv",
    "attn_q_norm.weight": "layers.q_norm",
    "attn_k_norm.weight": "layers.k_norm",
    "ffn_norm.weight": "layers.mlp_norm",
    "ffn_gate.weight": "layers.w_gate",
    "ffn_up.weight": "layers.w_up",
    "ffn_down.weight": "layers.w_down",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
_GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
# Stored by ggml as (out, in) rows; the canonical layout is (in, out).
_PROJECTIONS = {"layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up",
                "layers.w_down", "lm_head"}


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: ggml's dimension list reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """Parsed header of a GGUF file plus a read-only map of its bytes."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data: np.memmap

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy order (a read-only view for F32 tensors)."""
        info = self.tensors[name]
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block_size * type_size
        raw = self.data[info.offset:info.offset + info.nbytes].reshape(*info.shape[:-1], row_bytes)
        try:
            values = dequantize(raw, info.qtype)
        except NotImplementedError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r}: ggml type {info.qtype.name} "
                                  f"cannot be dequantized ({err})") from err
        return values.astype(np.float32, copy=False)


class _Cursor:
    """Sequential little-endian reader that names what it was reading when the file ends too early."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.context = "file header"

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file: {self.context} needs {n} bytes "
                                  f"at offset {self.pos} but the file has {len(self.buf)} bytes")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {self.context} holds invalid UTF-8") from err

    def value(self, kind: int):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            element_kind, count = self.scalar("<I"), self.scalar("<Q")
            if element_kind in _ARRAY_DTYPES:
                dtype = _ARRAY_DTYPES[GGUFValueType(element_kind)]
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).copy()
            # Every other element needs at least a string length prefix: reject absurd counts before looping.
            if count * _STRING_LENGTH_BYTES > len(self.buf) - self.pos:
                raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file: {self.context} claims "
                                      f"{count} array elements, more than the remaining bytes can hold")
            return [self.value(element_kind) for _ in range(count)]
        if kind not in _SCALAR_FORMATS:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {self.context} has unknown value type {kind}")
        value = self.scalar(_SCALAR_FORMATS[GGUFValueType(kind)])
        # A float32 field written from 1e-5 reads back as 9.99999974e-06: keep the decimal it was written from.
        return float(str(np.float32(value))) if kind == GGUFValueType.FLOAT32 else value


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header (metadata and tensor directory) of a GGUF file without reading tensor data."""
    path = Path(path)
    size = path.stat().st_size
    if size < len(GGUF_MAGIC):
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data), path)
    magic = bytes(cursor.take(len(GGUF_MAGIC)))
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cursor.scalar("<I")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise CheckpointError(f"{path}: unsupported GGUF version {version} (supported: {SUPPORTED_GGUF_VERSIONS}, "
                              "little-endian)")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")

    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        cursor.context = f"metadata entry {index}"
        key = cursor.string()
        cursor.context = f"metadata key {key!r}"
        metadata[key] = cursor.value(cursor.scalar("<I"))

    infos = []
    for index in range(tensor_count):
        cursor.context = f"tensor directory entry {index}"
        name = cursor.string()
        cursor.context = f"tensor {name!r} directory entry"
        n_dims = cursor.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name!r} has {n_dims} dimensions")
        dims = [cursor.scalar("<Q") for _ in range(n_dims)]
        type_id = cursor.scalar("<I")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise CheckpointError(f"{path}: tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                  f"{qtype.name} block size {block_size}")
        nbytes = int(np.prod(dims, dtype=np.int64)) // block_size * type_size
        infos.append((name, tuple(reversed(dims)), qtype, cursor.scalar("<Q"), nbytes))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset, nbytes in infos:
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes}"
                                  f" but the file has {size} bytes")
        tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)
    return GGUFFile(path, metadata, tensors, data)


def _field(gguf: GGUFFile, key: str, kind: type, default: Any = None):
    value = gguf.metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"{gguf.path}: missing metadata field {key!r}")
    if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, (int, float, np.number)):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise CheckpointError(f"{gguf.path}: metadata field {key!r} must be a single {kind.__name__}, got {value!r:.80}")


def _token_id(gguf: GGUFFile, role: str) -> int | None:
    key = f"tokenizer.ggml.{role}_token_id"
    return _field(gguf, key, int) if key in gguf.metadata else None


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Translate GGUF metadata (llama, qwen2, qwen3 architectures) into a ModelConfig."""
    arch = _field(gguf, "general.architecture", str)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(f"{gguf.path}: general.architecture {arch!r} is not supported "
                              f"(supported: {SUPPORTED_GGUF_ARCHITECTURES})")
    hidden = _field(gguf, f"{arch}.embedding_length", int)
    num_heads = _field(gguf, f"{arch}.attention.head_count", int)
    head_dim = _field(gguf, f"{arch}.attention.key_length", int, hidden // num_heads)
    rotary_dim = _field(gguf, f"{arch}.rope.dimension_count", int, head_dim)
    if rotary_dim != head_dim:
        raise CheckpointError(f"{gguf.path}: {arch}.rope.dimension_count {rotary_dim} differs from the head size "
                              f"{head_dim}; partial rotary embeddings are not supported")
    scaling = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{gguf.path}: {arch}.rope.scaling.type {scaling!r} is not supported")
    if "rope_freqs.weight" in gguf.tensors:
        raise CheckpointError(f"{gguf.path}: tensor 'rope_freqs.weight' (RoPE frequency table) is not supported")
    if "token_embd.weight" not in gguf.tensors:
        raise CheckpointError(f"{gguf.path}: missing tensor 'token_embd.weight'")
    # Chat models may end a turn with an end-of-turn token that differs from end-of-sequence: stop on both.
    eos_ids = []
    for token in (_token_id(gguf, "eos"), _token_id(gguf, "eot")):
        if token is not None and token not in eos_ids:
            eos_ids.append(token)
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=_field(gguf, f"{arch}.vocab_size", int, gguf.tensors["token_embd.weight"].shape[0]),
            hidden_size=hidden,
            intermediate_size=_field(gguf, f"{arch}.feed_forward_length", int),
            num_layers=_field(gguf, f"{arch}.block_count", int),
            num_heads=num_heads,
            num_kv_heads=_field(gguf, f"{arch}.attention.head_count_kv", int, num_heads),
            head_dim=head_dim,
            rope_theta=_field(gguf, f"{arch}.rope.freq_base", float, 10000.0),
            rms_norm_eps=_field(gguf, f"{arch}.attention.layer_norm_rms_epsilon", float),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            max_position_embeddings=_field(gguf, f"{arch}.context_length", int),
            bos_token_id=_token_id(gguf, "bos"),
            eos_token_ids=tuple(eos_ids),
        )
    except ConfigError as err:
        raise CheckpointError(f"{gguf.path}: {err}") from err


def _canonical_name(gguf_name: str, num_layers: int) -> tuple[str, int | None] | None:
    """(canonical name, layer index or None) of a GGUF tensor name; None when it has no place in the model."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name], None
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or int(match[1]) >= num_layers or match[2] not in _LAYER_TENSORS:
        return None
    return _LAYER_TENSORS[match[2]], int(match[1])


def _gguf_name(canonical: str, layer: int | None) -> str:
    table = _GLOBAL_TENSORS if layer is None else _LAYER_TENSORS
    suffix = next(g for g, c in table.items() if c == canonical)
    return suffix if layer is None else f"blk.{layer}.{suffix}"


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """View of llama.cpp's interleaved Q/K rows (out, in) in Hugging Face rotate-half order, per head.

    llama.cpp reorders each head's rows (first half, second half) into pairs so that ggml can rotate
    adjacent elements; splitting the pair axis back out and moving it in front restores the halves.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, in_features).swapaxes(1, 2)


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical float32 parameters of a GGUF checkpoint (Q/K rows back in rotate-half order)."""
    gguf = read_gguf(path)
    cfg = config_from_gguf(gguf)
    shapes = param_shapes(cfg)
    params = {name: np.empty(shape, np.float32) for name, shape in shapes.items()}

    # Check every name and shape before the (slow) dequantisation: GGUF name -> (canonical, layer).
    targets = {}
    for name, info in gguf.tensors.items():
        target = _canonical_name(name, cfg.num_layers)
        if target is None or target[0] not in shapes:
            raise CheckpointError(f"{gguf.path}: unexpected tensor {name!r} for a {cfg.arch} model with "
                                  f"{cfg.num_layers} layers")
        canonical, layer = target
        expected = shapes[canonical][0 if layer is None else 1:]
        if canonical in _PROJECTIONS:
            expected = expected[::-1]
        if info.shape != expected:
            raise CheckpointError(f"{gguf.path}: tensor {name!r} has shape {info.shape} (numpy order), "
                                  f"the metadata implies {expected}")
        targets[name] = target
    found = set(targets.values())
    for canonical in shapes:
        for layer in range(cfg.num_layers) if canonical.startswith("layers.") else [None]:
            if (canonical, layer) not in found:
                raise CheckpointError(f"{gguf.path}: missing tensor {_gguf_name(canonical, layer)!r}")

    for name, (canonical, layer) in targets.items():
        dst = params[canonical] if layer is None else params[canonical][layer]
        weight = gguf.dequantized(name)
        if cfg.arch == "llama" and canonical in ("layers.wq", "layers.wk"):
            heads = cfg.num_heads if canonical == "layers.wq" else cfg.num_kv_heads
            rows = _unpermute_rows(weight, heads)  # (heads, 2, head_dim // 2, in)
            dst.reshape(dst.shape[0], *rows.shape[:3])[...] = rows.transpose(3, 0, 1, 2)
        elif canonical in _PROJECTIONS:
            dst[...] = weight.T
        else:
            dst[...] = weight
    return cfg, params
