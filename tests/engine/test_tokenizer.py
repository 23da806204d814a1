"""Our tokenizer against transformers' for the same GGUF, plus streaming detokenization."""

from __future__ import annotations

import os
import random

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer
from splitserve.model.gguf_file import GGUFFile
from splitserve.model.gguf_loader import read_metadata

TEXTS = [
    "Hello, world!",
    "",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n    indented\n",
    "def square(x: int) -> int:\n    return x ** 2  # why not\n",
    "numbers 1234567 3.14159 -42 1e-9 ²³",
    "emoji 😀🎉 👍🏽 family 👨\u200d👩\u200d👧",
    "中文测试，日本語のテキスト、한국어",
    "accents: café naïve résumé Ωμέγα Привет",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "special <|endoftext|> in the middle",
    "tabs\tand\r\nwindows line ends",
    "contractions: don't, I'll, we've, THEY'RE",
    "url https://example.com/a?b=c&d=e#frag",
]

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Ça va ? 😀"},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm2_checkpoint) -> Tokenizer:
    assert smollm2_checkpoint.tokenizer is not None
    return smollm2_checkpoint.tokenizer


@pytest.fixture(scope="module")
def theirs(hf_reference):
    return hf_reference[1]


@pytest.mark.slow
def test_special_ids(ours: Tokenizer, theirs) -> None:
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_ids == (2,) == (theirs.eos_token_id,)
    assert ours.token_to_id("<|im_end|>") == 2
    assert ours.id_to_token(2) == "<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours: Tokenizer, theirs, text: str) -> None:
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
        text, add_special_tokens=False
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.slow
def test_decode_roundtrip(ours: Tokenizer, theirs, text: str) -> None:
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_special_tokens_stay_whole(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>assistant\n")
    assert ids[0] == ours.token_to_id("<|im_start|>")
    assert "<|im_start|>" not in ours.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, theirs, messages: list[dict], add_generation_prompt: bool
) -> None:
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_default_chat_template_is_chatml(ours: Tokenizer) -> None:
    plain = Tokenizer(ours.backend, eos_token="<|im_end|>")
    assert plain.chat_template == DEFAULT_CHAT_TEMPLATE
    text = plain.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_is_sandboxed(ours: Tokenizer) -> None:
    import jinja2

    evil = Tokenizer(ours.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([])
    raising = Tokenizer(ours.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        raising.apply_chat_template([])


@pytest.mark.slow
def test_hf_folder_tokenizer_matches_transformers(ours: Tokenizer, theirs, tmp_path) -> None:
    theirs.save_pretrained(tmp_path)
    folder = Tokenizer.from_hf_folder(str(tmp_path))
    assert folder is not None
    assert folder.eos_token_ids == (2,) and folder.bos_token_id == 1
    for text in TEXTS:
        assert folder.encode(text) == theirs.encode(text)
    assert folder.apply_chat_template(CONVERSATIONS[2]) == ours.apply_chat_template(
        CONVERSATIONS[2]
    )
    assert Tokenizer.from_hf_folder(str(tmp_path / "missing")) is None


def _stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    deltas, start = [], 0
    for size in sizes:
        deltas.append(detok.add(ids[start : start + size]))
        start += size
    deltas.append(detok.add(ids[start:]))
    deltas.append(detok.flush())
    return deltas


def test_incremental_detokenizer_holds_split_characters(ours: Tokenizer) -> None:
    text = "Emoji 😀 and 🎉, CJK 中文 and accents é, then 👨\u200d👩\u200d👧 done."
    ids = ours.encode(text)
    # Some emoji must really be split over byte tokens, or this test proves nothing.
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)
    deltas = _stream(IncrementalDetokenizer(ours), ids, [1] * len(ids))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == ours.decode(ids) == text


def test_incremental_detokenizer_with_prompt(ours: Tokenizer) -> None:
    prompt = ours.encode(ours.apply_chat_template([{"role": "user", "content": "Hi"}]))
    output = ours.encode("Hello! 😀 How can I help?<|im_end|>")
    detok = IncrementalDetokenizer(ours, prompt_ids=prompt)
    deltas = _stream(detok, output, [1] * len(output))
    assert "".join(deltas) == ours.decode(output) == "Hello! 😀 How can I help?"
    keep = IncrementalDetokenizer(ours, skip_special_tokens=False)
    assert "".join(_stream(keep, output, [3, 3])).endswith("<|im_end|>")


def test_incremental_detokenizer_decodes_a_short_window(ours: Tokenizer) -> None:
    windows: list[int] = []

    class Recording(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    recording = Recording(ours.backend)
    ids = ours.encode("word " * 400)
    assert len(ids) >= 400
    deltas = _stream(IncrementalDetokenizer(recording), ids, [1] * len(ids))
    assert "".join(deltas) == "word " * 400
    assert max(windows) <= 4  # O(new tokens) per call, however long the output grows


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40), seed=st.integers(0, 2**16))
def test_incremental_detokenizer_property(smollm2_checkpoint, text: str, seed: int) -> None:
    tok = smollm2_checkpoint.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    sizes = [rng.randint(0, 3) for _ in range(len(ids))]
    deltas = _stream(IncrementalDetokenizer(tok), ids, sizes)
    full = tok.decode(ids)
    assert "".join(deltas) == full
    # A byte the vocabulary lacks is dropped, leaving a real U+FFFD in the text itself.
    assert "\ufffd" in full or all("\ufffd" not in d for d in deltas)


def _write_sentencepiece_gguf(path: str, add_space_prefix: bool) -> None:
    """A tiny llama-architecture GGUF whose vocabulary is sentencepiece-style (no merges)."""
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "▁t", "he", "▁the", "an", "▁an", "▁and", "▁a"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path) -> None:
    from transformers import AutoTokenizer

    path = os.path.join(tmp_path, "sp.gguf")
    _write_sentencepiece_gguf(path, add_space_prefix=True)
    ours = Tokenizer.from_gguf_metadata(read_metadata(GGUFFile(path)))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["the and an", " the", "hat ten", "zebra ü 😀", "<s>the</s> and", "a  b"]:
        assert ours.encode(text) == theirs.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("x")[0] == ours.bos_token_id == 1  # llama vocabularies add BOS


def test_sentencepiece_gguf_without_space_prefix(tmp_path) -> None:
    # transformers ignores this flag; llama.cpp, whose files these are, honours it.
    path = os.path.join(tmp_path, "sp.gguf")
    _write_sentencepiece_gguf(path, add_space_prefix=False)
    tok = Tokenizer.from_gguf_metadata(read_metadata(GGUFFile(path)))
    assert tok.encode("the", add_special_tokens=False) == [tok.token_to_id(p) for p in ("t", "he")]
    assert tok.encode(" the", add_special_tokens=False) == [tok.token_to_id("▁the")]
    assert tok.decode(tok.encode(" the and")) == " the and"


def test_gguf_tokenizer_errors() -> None:
    from splitserve.model.loader import ModelLoadError

    tokens = ["a", "b", "ab"]
    with pytest.raises(ModelLoadError, match="'bert'"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens}
        )
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    bad_merges = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.merges": ["a c"]}  # fmt: skip
    with pytest.raises(ModelLoadError, match="corrupt"):
        Tokenizer.from_gguf_metadata(bad_merges)
