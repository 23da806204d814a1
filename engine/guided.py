"""Structured outputs: a grammar per request, a token mask per step (llguidance).

A request may carry a `GuidedSpec` (a JSON schema, any JSON object, a regex, or a choice among
strings). The spec is plain data: it travels with the request over the wire (SamplingOptions'
guided fields) and every engine that serves the request builds its own matcher from it, then
feeds the matcher the output tokens the request already has. So a request prefilled on one
worker and decoded on another, or resumed elsewhere after a failure, is constrained the same.

Per step the sampler asks `grammar_mask` for the rows that have a guide: one int32 bitmask for
all of them, filled by llguidance's executor (Rust, off the GIL, in parallel), unpacked with one
tensor op and applied to the logits before greedy or sampling. EOS is in the mask only when the
grammar accepts what came so far; a matcher that has failed allows only EOS.

Why llguidance rather than xgrammar: docs/structured_outputs.md (bench/grammar_libs.py).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from splitserve.engine.sampling_params import SamplingParamsError

if TYPE_CHECKING:
    from splitserve.engine.tokenizer import Tokenizer

# The documented limits (docs/structured_outputs.md): a spec's text (schema JSON, regex, the
# choices together) and how many choices; past them the request is refused, not compiled.
MAX_SPEC_BYTES = 64 * 1024
MAX_CHOICES = 256
# llguidance's own bound on a grammar's size after expansion (e.g. a schema whose $refs or
# repeats blow up); a larger one is refused as too large.
MAX_GRAMMAR_SIZE = 500_000

KINDS = ("json_schema", "json_object", "regex", "choice")


class GuidedSpecError(SamplingParamsError):
    """The spec can't be used: malformed, unsatisfiable, unsupported or too large."""


@dataclass(frozen=True)
class GuidedSpec:
    """What a request's output must match. `value`: the schema as JSON text (json_schema) or
    the regex; `choices`: the strings of a choice. json_object needs neither."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()

    def check_shape(self) -> None:
        """Without a tokenizer: the kind, the sizes. GuidedSpecError names the problem."""
        if self.kind not in KINDS:
            raise GuidedSpecError(f"guided decoding kind must be one of {KINDS}; got {self.kind!r}")
        size = len(self.value.encode()) + sum(len(c.encode()) for c in self.choices)
        if size > MAX_SPEC_BYTES:
            raise GuidedSpecError(
                f"the {self.kind} spec has {size} bytes; the limit is {MAX_SPEC_BYTES}"
            )
        if self.kind == "choice":
            if not self.choices:
                raise GuidedSpecError("a choice needs at least one string")
            if len(self.choices) > MAX_CHOICES:
                raise GuidedSpecError(f"at most {MAX_CHOICES} choices; got {len(self.choices)}")
            if any(not c for c in self.choices):
                raise GuidedSpecError("choices must be non-empty strings")
        elif self.kind in ("json_schema", "regex") and not self.value:
            raise GuidedSpecError(f"the {self.kind} must not be empty")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this spec."""
        import llguidance

        self.check_shape()
        if self.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(self.value))
        if self.kind == "choice":
            # Lark string literals take JSON's escapes, so any text is one literal.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)
            return str(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"))
        schema: Any = self.value if self.kind == "json_schema" else {"type": "object"}
        # Compact JSON (no free whitespace): a small model given room for spaces and newlines
        # may never close the object.
        defaults = {"whitespace_flexible": False}
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults))


def closed_schema(schema: Any) -> Any:
    """OpenAI's `strict: true`: every object without `additionalProperties` gets `false`, so
    the output has exactly the properties the schema names (the copy; `schema` is untouched)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    is_object = out.get("type") == "object" or (
        isinstance(out.get("type"), list) and "object" in out["type"]
    )
    if (is_object or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Guide:
    """One request's matcher: fed every output token, asked for the next mask."""

    def __init__(self, matcher: Any, mask_vocab: int) -> None:
        self.matcher = matcher
        self.mask_vocab = mask_vocab  # the bitmask's width in tokens (the tokenizer view's)

    def accept(self, token_id: int) -> bool:
        """Advance by the token the request produced; False (and the matcher failed, so only
        EOS is allowed from now on) if the grammar does not allow it."""
        if self.matcher.is_stopped():
            return True  # the grammar ended: EOS and what follows it do not matter
        return bool(self.matcher.consume_token(token_id)) and not self.matcher.is_error()

    def consume(self, token_ids: Iterable[int]) -> bool:
        return all(self.accept(t) for t in token_ids)

    @property
    def failed(self) -> bool:
        return bool(self.matcher.is_error())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


class GrammarCompiler:
    """Per tokenizer: checks specs and makes guides. Thread-safe; the tokenizer view (about a
    second for a 49k vocabulary) is built on first use and compiled grammars are kept (LRU) so
    a repeated spec costs a copy of its matcher."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache: int = 64
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids) or list(tokenizer.eos_token_ids)
        self._cache_size = cache
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        # Tokens the tokenizer knows beyond the model's (rare) are still in its masks.
        self.mask_vocab = max(vocab_size, tokenizer.vocab_size)
        self._compiled: OrderedDict[GuidedSpec, Any] = OrderedDict()

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.mask_vocab, eos_token=self._eos
                )
            return self._ll_tokenizer

    def check(self, spec: GuidedSpec) -> None:
        """GuidedSpecError unless the spec compiles and its language is not empty."""
        self._template(spec)

    def guide(self, spec: GuidedSpec, output_token_ids: Sequence[int] = ()) -> Guide:
        """A fresh guide for a request, advanced past the output it already has (a request
        resumed elsewhere, or decoded after a remote prefill)."""
        guide = Guide(self._template(spec).deep_copy(), self.mask_vocab)
        if output_token_ids and not guide.consume(output_token_ids):
            raise GuidedSpecError("the request's output so far does not match its grammar")
        return guide

    def _template(self, spec: GuidedSpec) -> Any:
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
        matcher = self._compile(spec)
        with self._lock:
            self._compiled[spec] = matcher
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def _compile(self, spec: GuidedSpec) -> Any:
        import llguidance

        try:
            grammar = spec.grammar()
        except GuidedSpecError:
            raise
        except Exception as e:  # a schema that isn't JSON, a regex llguidance can't parse
            raise GuidedSpecError(f"invalid {spec.kind}: {_first_line(e)}") from e
        limits = llguidance.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SIZE)
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise GuidedSpecError(f"invalid {spec.kind}: {_first_line(matcher.get_error())}")
        # An empty language (a regex like [^\s\S], an unsatisfiable schema) fails on the first
        # mask: nothing but EOS is allowed before anything matched.
        probe = matcher.deep_copy()
        mask = allocate_bitmask(1, self.mask_vocab)
        fill_bitmask([probe], mask)
        if probe.is_error():
            raise GuidedSpecError(
                f"the {spec.kind} can never be satisfied: {_first_line(probe.get_error())}"
            )
        return matcher


def _first_line(e: object) -> str:
    text = str(e).strip()
    return (text.splitlines() or [""])[0][:300]


# ---- the batch's mask ------------------------------------------------------------------------
_executor_lock = threading.Lock()
_executor: Any = None
_SHIFTS = torch.arange(32, dtype=torch.int32)


def _llg_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        return _executor


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def fill_bitmask(matchers: Sequence[Any], bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` (int32, CPU) gets matcher i's allowed tokens, all rows at once on
    llguidance's threads (the GIL is released meanwhile)."""
    if not matchers:
        return
    _llg_executor().unsafe_compute_mask_ptr(
        [(m, i) for i, m in enumerate(matchers)],
        bitmask.data_ptr(),
        bitmask.shape[1] * 4,
        bitmask.shape[0],
    )


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, vocab_size) bool from an int32 bitmask (bit j of word w: token 32 w + j)."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def grammar_mask(guides: Sequence[Guide], vocab_size: int, device: torch.device) -> torch.Tensor:
    """The guides' allowed tokens for this step, (len(guides), vocab_size) bool on `device`.
    Beyond the tokenizer's vocabulary (a padded LM head) nothing is allowed."""
    width = max(g.mask_vocab for g in guides)
    bitmask = allocate_bitmask(len(guides), width)
    fill_bitmask([g.matcher for g in guides], bitmask)
    allowed = allowed_tokens(bitmask, min(width, vocab_size))
    if width < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - width), value=False)
    return allowed.to(device, non_blocking=True) if allowed.device != device else allowed


# ---- the wire (SamplingOptions' `guided` oneof; duck-typed, so the engine imports no stubs) ----
def spec_from_proto(opts: Any) -> GuidedSpec | None:
    """The spec a SamplingOptions message carries, None when it has none. `guided_strict` is
    applied here (the schema is closed), so every side sees the same schema."""
    which = opts.WhichOneof("guided")
    if which == "guided_json":
        if not opts.guided_strict:
            return GuidedSpec("json_schema", opts.guided_json)
        try:
            schema = json.loads(opts.guided_json)
        except ValueError as e:
            raise GuidedSpecError(f"invalid json_schema: {_first_line(e)}") from e
        return GuidedSpec("json_schema", json.dumps(closed_schema(schema)))
    if which == "guided_regex":
        return GuidedSpec("regex", opts.guided_regex)
    if which == "guided_choice":
        return GuidedSpec("choice", choices=tuple(opts.guided_choice.choices))
    if which == "guided_json_object" and opts.guided_json_object:
        return GuidedSpec("json_object")
    return None


def spec_to_proto(spec: GuidedSpec | None, opts: Any) -> None:
    """Set `opts`' guided fields from the spec (nothing for None)."""
    if spec is None:
        return
    if spec.kind == "json_schema":
        opts.guided_json = spec.value
    elif spec.kind == "regex":
        opts.guided_regex = spec.value
    elif spec.kind == "choice":
        opts.guided_choice.choices.extend(spec.choices)
    elif spec.kind == "json_object":
        opts.guided_json_object = True
