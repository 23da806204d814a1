"""Text <-> token ids, the chat template, and streaming detokenization.

A `Tokenizer` wraps a `tokenizers.Tokenizer`. From a Hugging Face folder that is `tokenizer.json`
as is; from a GGUF file we rebuild it from llama.cpp's metadata the way `transformers` does
(`transformers/integrations/gguf`), so that ids match the reference for the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from .config import ModelLoadError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp `tokenizer.ggml.token_type` values.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# Ids the model ends a turn with besides eos (llama.cpp stops on these too).
GGUF_END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# Pre-tokenizer splits for `tokenizer.ggml.pre`; any other value keeps GPT-2's byte-level regex
# (as transformers does, e.g. for SmolLM's "smollm").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # unprintable bytes move past 255, in order
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        special_tokens_map: Mapping[str, str | None] | None = None,
    ) -> None:
        """`backend` must already add BOS/EOS in its post-processor if the model wants them."""
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        eos_id = self.token_to_id(eos_token) if eos_token else None
        ids = ([] if eos_id is None else [eos_id]) + [int(i) for i in extra_eos_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.special_tokens_map = dict(
            special_tokens_map or {"bos_token": bos_token, "eos_token": eos_token}
        )
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` adds BOS/EOS where the model asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` as the model's prompt text (special tokens written out as text)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {**self.special_tokens_map, **kwargs}
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF's `tokenizer.*` fields (as plain values: strings, ints, lists)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("the GGUF file has no tokenizer vocabulary")
        builders = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}
        if kind not in builders:
            raise ModelLoadError(f"unsupported GGUF tokenizer {kind!r}; supported: gpt2, llama")
        try:
            backend = builders[kind](metadata)
        except Exception as e:  # tokenizers' Rust errors are plain Exceptions
            raise ModelLoadError(f"corrupt GGUF tokenizer metadata ({e})") from e

        special = {
            name: tokens[i] if isinstance(i := metadata.get(key), int) and i < len(tokens) else None
            for name, key in GGUF_SPECIAL_TOKENS.items()
        }
        _add_special_tokens(backend, metadata, [t for t in special.values() if t])
        # llama.cpp adds BOS by default for sentencepiece vocabularies that do not say otherwise.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
        bos, eos = special["bos_token"], special["eos_token"]
        _set_post_processor(backend, bos if add_bos else None, eos if add_eos else None)
        eot = [metadata[k] for k in GGUF_END_OF_TURN_KEYS if k in metadata]
        return cls(
            backend,
            bos_token=special["bos_token"],
            eos_token=special["eos_token"],
            extra_eos_ids=eot,
            chat_template=metadata.get("tokenizer.chat_template"),
            special_tokens_map=special,
        )

    @classmethod
    def from_hf_folder(cls, path: str) -> Tokenizer | None:
        """Build from `tokenizer.json` (+ `tokenizer_config.json`); None if the folder has none."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises plain Exception for a bad file
            raise ModelLoadError(f"{tokenizer_file}: unreadable tokenizer ({e})") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        if "add_bos_token" in config or "add_eos_token" in config:
            # An explicit flag overrides tokenizer.json's post-processor, as in transformers.
            _set_post_processor(
                backend,
                special["bos_token"] if config.get("add_bos_token") else None,
                special["eos_token"] if config.get("add_eos_token") else None,
            )
        return cls(
            backend,
            bos_token=special["bos_token"],
            eos_token=special["eos_token"],
            extra_eos_ids=_generation_eos_ids(path),
            chat_template=_hf_chat_template(path, config),
            special_tokens_map=special,
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, one instance per request.

    Each call decodes only a short window `ids[prefix_offset:]` and emits what it adds beyond
    `ids[prefix_offset:read_offset]` (vLLM's scheme): decoding the window rather than the new
    tokens alone keeps context-dependent spacing right, and keeps each call O(new tokens). Text
    ending in U+FFFD is an incomplete UTF-8 character split across byte tokens and is held back.

    Without `prompt_ids`, the deltas plus `flush()` equal `decode(all ids)`. With them, the last
    prompt tokens seed the window, so a sentencepiece first token keeps its leading space.
    """

    PROMPT_CONTEXT = 5  # prompt tokens kept as left context (vLLM uses the same)

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the window is kept: the prompt tail and the not-yet-settled output tokens.
        self._ids = list(prompt_ids[-(self.PROMPT_CONTEXT + 1) :]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is now final (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Everything still held back (e.g. an incomplete character at the end of the stream)."""
        prefix_text, new_text = self._decode_window()
        return self._advance(new_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        settled = self._read_offset - self._prefix_offset
        decode = self.tokenizer.decode
        prefix_text = decode(window[:settled], self.skip_special_tokens) if settled else ""
        return prefix_text, decode(window, self.skip_special_tokens)

    def _advance(self, delta: str) -> str:
        # The just-settled tokens become the next window's left context; older ones are dropped.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta


def _byte_level_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    spelling = byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        # Some converters store raw text; the BPE model needs the byte alphabet.
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())

    vocab = {spelled(t): i for i, t in enumerate(metadata["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", ())]
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    split = GGUF_PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """A sentencepiece BPE vocabulary (`tokenizer.ggml.model == "llama"`), as LlamaTokenizer."""
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:  # the space the pre-tokenizer prepended is not part of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple]:
    """Sentencepiece stores no merges: every split of a token into two known pieces is one,
    ranked by the merged token's score (best first), ties broken by the shorter left piece."""
    ranked = []
    for token, score in scores.items():
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    # A stable sort on (score, len(left), len(right)), descending, as transformers ranks them.
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_special_tokens(
    backend: tokenizers.Tokenizer, metadata: Mapping[str, Any], named: list[str]
) -> None:
    """Control tokens (and the named bos/eos/unk/pad) match whole and are skipped on decode;
    user-defined ones match whole but are ordinary text."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    alphabet = set(byte_alphabet().values())
    byte_level = metadata.get("tokenizer.ggml.model") == "gpt2"
    control = [t for t, k in zip(tokens, types, strict=False) if k == TOKEN_TYPE_CONTROL]
    # In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a
    # llama.cpp mislabel; adding it would grow the vocabulary past the model's.
    control = [t for t in control if not byte_level or set(t) <= alphabet]
    specials = list(
        dict.fromkeys(control + [t for t in named if backend.token_to_id(t) is not None])
    )
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [t for t, k in zip(tokens, types, strict=False) if k == TOKEN_TYPE_USER_DEFINED]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    def sequence(piece: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos, piece, eos) if t]

    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=special,
    )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _hf_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is what we serve
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _generation_eos_ids(path: str) -> list[int]:
    """End-of-turn ids the model stops on beyond the tokenizer's eos (generation_config.json)."""
    eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering a prompt only needs its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Chat templates come with downloaded models: render them sandboxed, with the helpers
    transformers offers them."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        # Jinja's own tojson HTML-escapes, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
