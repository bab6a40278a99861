"""Incremental detokenization of one request's output, with stop strings.

Streaming needs text as tokens arrive, but a token may carry only part of a UTF-8 character and decoded
text may still turn out to be the start of a stop string. Decoding the whole output after every token would
cost O(length) per token; instead each token is decoded within a small window of recent tokens (the
"prefix offset" technique): the window starts at the last point where the text was complete, so the
window's text minus the text of its already-read part is exactly what the new token adds.

Speculative decoding accepts several tokens per step, so `push` takes a list and checks stop strings
after every token: `num_tokens_to_keep` says which token completed a stop string, letting the engine cut
its token ids at the same place the text was cut. Without stop strings there is nothing to check per token,
and a push decodes its tokens together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparsespec_jax.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for bytes that do not (yet) form a character
_PROMPT_CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the output, so its first token decodes in context
_MAX_PARTIAL_TOKENS = 3     # an unfinished UTF-8 character has at most 3 bytes, so it spans at most 3 tokens


class DetokenizerError(ValueError):
    """Misuse of an incremental detokenizer: bad stop strings, or tokens pushed after it finished."""


class IncrementalDetokenizer:
    """Turns one request's output tokens into text chunks safe to show as they arrive.

    `push` returns only stable text: never half a UTF-8 character and never a tail that could still grow
    into a stop string. Once a stop string appears, the text is cut before it (`stopped` turns true,
    `stop_reason` names it) and later tokens of the same push are ignored. `finish` releases what is
    held back when the output ends for another reason (eos, length). The concatenation of every returned
    chunk is `text`.
    """

    def __init__(self, tokenizer: "Tokenizer", prompt_ids: Sequence[int] | None = None,
                 stop: Sequence[str] = (), skip_special_tokens: bool = True):
        if isinstance(stop, str):
            raise DetokenizerError("stop: expected a list of strings, got a single string")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise DetokenizerError(f"stop[{i}]: stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        context = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]] if prompt_ids is not None else []
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR):  # a prompt cut inside a character is no clean start
            context, context_text = [], ""
        self._num_context = len(context)
        self._ids: list[int] = context  # context tokens followed by the output tokens
        # Window: ids[prefix_offset:read_offset] were decoded last time (their text is `_prefix_text`),
        # ids[read_offset:] are tokens whose text is not yet complete.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text
        self._pending = ""  # decoded text not yet returned (held back for stop matching)
        self._chunks: list[str] = []
        self._stop_reason: str | None = None
        self._finished = False

    # ------------------------------------------------------------------------------------------ state

    @property
    def stopped(self) -> bool:
        """A stop string was found; the output ends before it."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    @property
    def matches_stop_strings(self) -> bool:
        """Whether text must be decoded as tokens arrive (to find stop strings) rather than at the end."""
        return bool(self._stop)

    @property
    def finished(self) -> bool:
        """No more tokens are accepted: a stop string was found or `finish` was called."""
        return self._finished

    @property
    def text(self) -> str:
        """All text returned so far (the final output text once `finished`)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_tokens_to_keep(self) -> int:
        """Output tokens that belong to the output: all pushed so far, or up to and including the token
        that completed the stop string."""
        return len(self._ids) - self._num_context

    # ------------------------------------------------------------------------------------------ input

    def push(self, token_ids: Sequence[int]) -> str:
        """Accept new output tokens; return the text that became stable."""
        if self._finished:
            raise DetokenizerError("push: the detokenizer has finished (stop string found or finish called)")
        if not self._stop:                    # nothing to match token by token: one window for all of them
            self._ids.extend(token_ids)
            # If the push ends inside a character, the text up to one of its last few tokens is still stable.
            for end in range(len(self._ids), max(self._read_offset, len(self._ids) - _MAX_PARTIAL_TOKENS - 1), -1):
                added = self._decode_new_text(final=False, end=end)
                if self._read_offset == end:
                    self._pending += added
                    break
            return self._emit()
        for token_id in token_ids:
            self._ids.append(token_id)
            added = self._decode_new_text(final=False)
            if added and self._append_and_match(added):
                break
        return self._emit()

    def finish(self) -> str:
        """End of output: return everything still held back (an incomplete character decodes as U+FFFD)."""
        if self._finished:
            return ""
        added = self._decode_new_text(final=True)
        if added:
            self._append_and_match(added)
        self._finished = True
        chunk = self._pending
        self._pending = ""
        self._chunks.append(chunk)
        return chunk

    # ------------------------------------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new_text(self, final: bool, end: int | None = None) -> str:
        """Text added by the unread tokens before `end` (default: all), or "" while they end inside a character
        (unless `final`); the tokens count as read only when their text was taken."""
        end = len(self._ids) if end is None else end
        if self._read_offset >= end:
            return ""
        window_text = self._decode(self._ids[self._prefix_offset:end])
        if not final and window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        added = window_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._prefix_text = self._decode(self._ids[self._prefix_offset:end])
        return added

    def _append_and_match(self, added: str) -> bool:
        """Add decoded text; on a stop string, cut the output before it and return True.

        Every earlier occurrence would have been found at an earlier token, so only matches reaching into
        the new text are possible: the search starts max_stop_len - 1 characters before it.
        """
        start = max(0, len(self._pending) - self._max_stop_len + 1)
        self._pending += added
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = self._pending.find(s, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return False
        self._pending = self._pending[:best[0]]
        self._stop_reason = best[1]
        self._finished = True
        return True

    def _emit(self) -> str:
        """Release pending text except a tail that may be the beginning of a stop string."""
        keep = 0 if self._finished else self._stop_prefix_tail_length()
        cut = len(self._pending) - keep
        chunk, self._pending = self._pending[:cut], self._pending[cut:]
        if chunk:
            self._chunks.append(chunk)
        return chunk

    def _stop_prefix_tail_length(self) -> int:
        """Length of the longest end of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
