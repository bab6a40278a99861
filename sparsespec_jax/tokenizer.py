"""Text <-> token ids for the engine, built on the `tokenizers` library (no transformers).

Two sources are supported: the tokenizer embedded in a GGUF file (`tokenizer.ggml.*` metadata, byte-level
BPE as written by llama.cpp's converter) and a Hugging Face model directory (tokenizer.json +
tokenizer_config.json). Both end up as the same `Tokenizer`, which `save_pretrained` writes back as a
Hugging Face directory, so a GGUF model can be served from either form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from sparsespec_jax.chat_template import render_chat_template


class TokenizerError(ValueError):
    """A tokenizer file or field is missing or malformed, or a request needs what the tokenizer lacks."""


# GGUF token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are plain added tokens.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# End-of-turn markers that chat templates close an assistant message with. A model that follows its
# template emits one of these instead of (or before) its eos token, so generation must stop there too.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Regexes of the pre-tokenizers that split text before byte-level BPE, keyed as in llama.cpp's
# `tokenizer.ggml.pre`. They must match the model's training-time split exactly or merges go wrong.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digit_splitting_pre_tokenizer():
    # GPT-2 regex, but every digit is its own pre-token (StarCoder/SmolLM family).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _regex_pre_tokenizer(pattern: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# name -> (pre-tokenizer factory, normalizer factory or None, BPE ignore_merges)
_GGUF_PRE_TOKENIZERS = {
    "default": (_gpt2_pre_tokenizer, None, False),
    "gpt-2": (_gpt2_pre_tokenizer, None, False),
    "smollm": (_digit_splitting_pre_tokenizer, None, False),
    "starcoder": (_digit_splitting_pre_tokenizer, None, False),
    "refact": (_digit_splitting_pre_tokenizer, None, False),
    "llama-bpe": (lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT), None, True),
    "qwen2": (lambda: _regex_pre_tokenizer(_QWEN2_SPLIT), normalizers.NFC, False),
}


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: malformed JSON ({e})") from None


def _token_content(value: Any, field: str, source: Path) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: field {field!r} must be a string or an object with 'content', got {value!r}")


def _config_chat_template(value: Any, source: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string or a list of named templates (use 'default')."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{source}: field 'chat_template' must be a string or a list with a 'default' entry")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: bos/eos ids and the chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, source: str):
        self.backend = backend
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = self._special_id(bos_token, "bos_token")
        self.eos_token_id = self._special_id(eos_token, "eos_token")
        # Whatever the post-processor does is authoritative: probe it rather than trust a config flag.
        self.add_bos = self.bos_token_id is not None and backend.encode("").ids[:1] == [self.bos_token_id]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = self._end_of_generation_ids()

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return token_id

    def _end_of_generation_ids(self) -> tuple[int, ...]:
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for marker in _END_OF_TURN_MARKERS:
            marker_id = self.backend.token_to_id(marker)
            if self.chat_template and marker in self.chat_template and marker_id is not None and marker_id not in ids:
                ids.append(marker_id)
        return tuple(ids)

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Build the byte-level BPE tokenizer that a GGUF file embeds (tokens, merges, types, specials)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: GGUF file not found")
        try:
            fields = GGUFReader(str(path)).fields
        except (ValueError, OSError) as e:
            raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None
        metadata = {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}
        return cls.from_gguf_metadata(metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> "Tokenizer":
        """Build the tokenizer from already-parsed GGUF metadata (key -> value; arrays as lists or numpy).

        GGUFReader needs seconds to parse a header with a large vocabulary, so a loader that has parsed the
        file for its weights should hand its metadata here instead of opening the file again.
        """

        def field(name: str, required: bool = True):
            if name not in metadata:
                if required:
                    raise TokenizerError(f"{source}: GGUF has no tokenizer metadata field {name!r}")
                return None
            return metadata[name]

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
        tokens = [str(t) for t in field("tokenizer.ggml.tokens")]
        merges = [str(m) for m in field("tokenizer.ggml.merges")]
        token_types = field("tokenizer.ggml.token_type", required=False)
        token_types = [1] * len(tokens) if token_types is None else [int(t) for t in token_types]
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries, "
                                 f"tokenizer.ggml.tokens has {len(tokens)}")
        pre = field("tokenizer.ggml.pre", required=False) or "default"
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; "
                                 f"supported: {sorted(_GGUF_PRE_TOKENIZERS)}")
        make_pre_tokenizer, make_normalizer, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]

        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens holds duplicate token strings")
        merge_pairs = []
        for i, merge in enumerate(merges):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens")
            merge_pairs.append((pair[0], pair[1]))

        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=ignore_merges))
        if make_normalizer is not None:
            backend.normalizer = make_normalizer()
        backend.pre_tokenizer = make_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([
            AddedToken(tokens[i], special=kind == _GGUF_CONTROL, normalized=False)
            for i, kind in enumerate(token_types) if kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ])

        def special(name: str) -> str | None:
            token_id = field(name, required=False)
            if token_id is None:
                return None
            if not 0 <= int(token_id) < len(tokens):
                raise TokenizerError(f"{source}: {name} = {token_id} is outside the vocabulary ({len(tokens)})")
            return tokens[int(token_id)]

        bos, eos = special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id")
        add_bos = bool(field("tokenizer.ggml.add_bos_token", required=False))
        if add_bos and bos is None:
            raise TokenizerError(f"{source}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        backend.post_processor = (_bos_template(bos, vocab[bos]) if add_bos
                                  else processors.ByteLevel(trim_offsets=False))
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=field("tokenizer.chat_template", False),
                   source=source)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and (if present) chat_template.jinja from a directory."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for every kind of failure
            _read_json(tokenizer_file)  # names the JSON syntax error, if that is the cause
            raise TokenizerError(f"{tokenizer_file}: not a valid tokenizers file ({e})") from None

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        if not isinstance(config, Mapping):
            raise TokenizerError(f"{config_file}: expected a JSON object")
        bos = _token_content(config.get("bos_token"), "bos_token", config_file)
        eos = _token_content(config.get("eos_token"), "eos_token", config_file)
        template_file = path / "chat_template.jinja"
        if template_file.exists():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _config_chat_template(config.get("chat_template"), config_file)

        if config.get("add_bos_token") is True:
            if bos is None:
                raise TokenizerError(f"{config_file}: add_bos_token is true but bos_token is not set")
            bos_id = backend.token_to_id(bos)
            if bos_id is None:
                raise TokenizerError(f"{config_file}: bos_token {bos!r} is not in the vocabulary")
            if backend.encode("").ids[:1] != [bos_id]:
                backend.post_processor = _bos_template(bos, bos_id)
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=chat_template, source=str(path))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json; `from_hf_dir` on the result rebuilds this tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")

    # ----------------------------------------------------------------------------------------- use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.

        `add_special_tokens` adds the bos token when the tokenizer does so (`add_bos`). Prompts rendered by
        a chat template usually carry their own bos text already: encode those with add_special_tokens=False.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids with no token (e.g. embedding padding rows) decode to nothing, as in HF."""
        try:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"decode: token ids must be non-negative integers ({e})") from None

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id) if token_id >= 0 else None
        if token is None:
            raise TokenizerError(f"id_to_token: id {token_id} is outside the vocabulary ({self.vocab_size})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` with the model's chat template; extra kwargs (tools, enable_thinking, ...)
        are template variables."""
        if not self.has_chat_template:
            raise TokenizerError(f"{self.source}: a chat prompt was requested but the tokenizer has no chat template")
        # Like Hugging Face, only special tokens the tokenizer has are defined for the template.
        specials = {name: token for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
                    if token is not None}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**specials, **kwargs})

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos_ids={self.eos_token_ids}, add_bos={self.add_bos}, chat_template={self.has_chat_template})")


def _bos_template(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=[bos, "$A"], pair=[bos, "$A", f"{bos}:1", "$B:1"],
                                         special_tokens=[(bos, bos_id)])
