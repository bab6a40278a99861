"""Rendering of Hugging Face style Jinja2 chat templates.

Templates come from model files (GGUF metadata, tokenizer_config.json), so they run in jinja2's immutable
sandbox. The environment mirrors the one Hugging Face renders with (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`) so that a model gets
exactly the prompt format it was trained on.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from sparsespec_jax.tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """A chat template does not compile, fails while rendering, or rejects the messages given to it."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's built-in tojson escapes HTML characters and non-ASCII text; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatTemplateError(f"messages: expected a list of role/content dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]: expected a dict with a string 'role', got {message!r}")


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """Render `template` for `messages`; `tools` (JSON schemas) and `variables` (bos_token, enable_thinking,
    ...) are template variables. `tools` is always defined (None when absent), as templates expect."""
    _check_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                               **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: rendering failed: {e}") from None
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise ChatTemplateError(f"chat template: rendering failed: {type(e).__name__}: {e}") from None


def chat_prompt(tokenizer: "Tokenizer", text: str, system: str | None = None, **template_kwargs: Any) -> str:
    """The prompt string for one user turn (optionally after a system message), ready for generation."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
