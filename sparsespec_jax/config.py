"""Model architecture description shared by every loader and the decoder.

One frozen dataclass covers the Llama family (incl. Llama 3 RoPE scaling) and the Qwen family
(Qwen2: q/k/v bias; Qwen3: per-head q/k RMSNorm). It is hashable so it can be a static jit argument.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A model configuration field is missing, malformed, or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"arch: unsupported architecture {self.arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta: must be > 0, got {self.rope_theta}")

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        scaling = data.pop("rope_scaling", None)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data, rope_scaling=RopeScaling(**scaling) if scaling else None)


def _require(hf: dict[str, Any], key: str, source: str):
    if key not in hf:
        raise ConfigError(f"{source}: missing field {key!r}")
    return hf[key]


def _rope_fields(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`; transformers 5 writes only the former."""
    params = hf.get("rope_parameters")
    if params is None:
        return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling") or None
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ConfigError(f"{source}: rope_parameters must be one object with a 'rope_theta' field "
                          f"(per-layer-type RoPE is not supported), got {params!r}")
    return float(params["rope_theta"]), params


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)."""
    model_type = _require(hf, "model_type", source)
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}.get(model_type)
    if arch is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (llama, qwen2, qwen3)")
    num_heads = _require(hf, "num_attention_heads", source)
    hidden = _require(hf, "hidden_size", source)
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope_theta, scaling = _rope_fields(hf, source)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (llama3 or none)")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        arch=arch,
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size", source),
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes: the contract between loaders and the decoder.

    Per-layer tensors are stacked on a leading layer axis so the decoder runs them with lax.scan.
    Projections are stored as (in_features, out_features). Q/K rows follow the Hugging Face
    (rotate-half RoPE) layout.
    """
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "embed": (cfg.vocab_size, D),
        "layers.attn_norm": (L, D),
        "layers.wq": (L, D, q_dim),
        "layers.wk": (L, D, kv_dim),
        "layers.wv": (L, D, kv_dim),
        "layers.wo": (L, q_dim, D),
        "layers.mlp_norm": (L, D),
        "layers.w_gate": (L, D, F),
        "layers.w_up": (L, D, F),
        "layers.w_down": (L, F, D),
        "final_norm": (D,),
    }
    if cfg.attention_bias:
        shapes.update({"layers.bq": (L, q_dim), "layers.bk": (L, kv_dim), "layers.bv": (L, kv_dim)})
    if cfg.qk_norm:
        shapes.update({"layers.q_norm": (L, cfg.head_dim), "layers.k_norm": (L, cfg.head_dim)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


def validate_params(cfg: ModelConfig, params: dict[str, Any], source: str) -> None:
    """Check a canonical parameter dict against the config; name the offending tensor on failure."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ConfigError(f"{source}: missing tensor(s) {missing} required by the config ({cfg.arch})")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ConfigError(f"{source}: unexpected tensor(s) {extra} for the config ({cfg.arch})")
    for name, shape in expected.items():
        got = tuple(params[name].shape)
        if got != shape:
            raise ConfigError(f"{source}: tensor {name!r} has shape {got}, config implies {shape}")
