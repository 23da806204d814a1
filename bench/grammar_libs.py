"""xgrammar vs llguidance on SmolLM2's tokenizer: the numbers in docs/structured_outputs.md.

    pip install xgrammar llguidance   # xgrammar is not a dependency of splitserve
    python3 -m splitserve.bench.grammar_libs [--steps 48] [--batch 32]

For each library: building its tokenizer view once, compiling each JSON schema and regex (a
fresh compiler per case, so nothing is cached), the time to fill the token bitmask of `--batch`
matchers per decoding step (walking each matcher along a valid document's tokens), and
correctness: every valid document is accepted token by token and ends in an accepting state,
every invalid one is refused, and a walk that always takes the first allowed token (the worst
case for a mask: whatever the model prefers) ends in a document that validates.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested+enum+array": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "role": {"enum": ["admin", "user", "guest"]},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                },
                "required": ["id", "role", "tags"],
            },
            "score": {"type": "number"},
            "active": {"type": "boolean"},
        },
        "required": ["user", "score", "active"],
    },
    "wide (40 fields)": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer"]} for i in range(40)},
        "required": [f"field_{i}" for i in range(40)],
    },
}
DOCS = {
    "flat": ({"name": "Ada", "age": 36}, {"name": "Ada"}),
    "nested+enum+array": (
        {"user": {"id": 7, "role": "admin", "tags": ["a", "b"]}, "score": 1.5, "active": True},
        {"user": {"id": 7, "role": "root", "tags": []}, "score": 1.5, "active": True},
    ),
    "wide (40 fields)": ({f"field_{i}": i for i in range(40)}, {"field_0": 0}),
}
REGEXES = {
    "date": (r"\d{4}-\d{2}-\d{2}", "2024-01-31", "2024-1-31"),
    "email": (r"[a-z]+@[a-z]+\.(com|org)", "ada@example.org", "ada@example"),
    "choice": (r"(positive|negative|neutral)", "neutral", "mixed"),
}


_CLOSING = set('"}],.@-:')


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def load_tokenizer() -> Any:
    from splitserve.engine.tokenizer import Tokenizer
    from splitserve.model.gguf_loader import _open_reader, read_metadata
    from splitserve.model.loader import default_model_path

    return Tokenizer.from_gguf_metadata(read_metadata(_open_reader(default_model_path())))


class Lib:
    name: str

    def compile_schema(self, schema: dict[str, Any]) -> Any: ...
    def compile_regex(self, regex: str) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def accept(self, m: Any, token: int) -> bool: ...
    def accepting(self, m: Any) -> bool: ...
    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None: ...
    def bitmask(self, n: int) -> torch.Tensor: ...


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tok: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t = time.perf_counter()
        vocab = [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
        self.info = xgr.TokenizerInfo(
            vocab,
            xgr.VocabType.BYTE_LEVEL,
            vocab_size=vocab_size,
            stop_token_ids=list(tok.eos_token_ids),
        )
        self.vocab_size = vocab_size
        self.init_s = time.perf_counter() - t
        self.batch = xgr.BatchGrammarMatcher() if hasattr(xgr, "BatchGrammarMatcher") else None

    def compile_schema(self, schema: dict[str, Any]) -> Any:
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False).compile_json_schema(
            json.dumps(schema), strict_mode=True, any_whitespace=False, separators=(",", ":")
        )

    def compile_regex(self, regex: str) -> Any:
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False).compile_regex(regex)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def accepting(self, m: Any) -> bool:
        return bool(m.is_terminated()) or bool(m.accept_token(self.info.stop_token_ids[0]))

    def bitmask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        if self.batch is not None:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tok: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        t = time.perf_counter()
        self.tok = llguidance.LLTokenizer(
            tok.backend.to_str(), n_vocab=vocab_size, eos_token=list(tok.eos_token_ids)
        )
        self.init_s = time.perf_counter() - t
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()

    def compile_schema(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        return self.llg.LLMatcher(self.tok, grammar, log_level=0)  # compiles here

    def compile_regex(self, regex: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_regex(regex)
        return self.llg.LLMatcher(self.tok, grammar, log_level=0)

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token)) and not m.is_error()

    def accepting(self, m: Any) -> bool:
        return bool(m.is_accepting())

    def bitmask(self, n: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


def _timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _allowed(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = bitmask_row.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32)
    flags = ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:vocab_size]
    return flags.bool()


def correctness(lib: Lib, tok: Any, vocab_size: int) -> list[str]:
    problems: list[str] = []
    cases: list[tuple[str, Any, str, str, Callable[[str], bool]]] = []
    for name, schema in SCHEMAS.items():
        import jsonschema

        good, bad = DOCS[name]

        def valid(text: str, schema: dict[str, Any] = schema) -> bool:
            try:
                jsonschema.validate(json.loads(text), schema)
            except Exception:
                return False
            return True

        cases.append((name, lib.compile_schema(schema), _compact(good), _compact(bad), valid))
    for name, (rx, good, bad) in REGEXES.items():
        cases.append(
            (
                name,
                lib.compile_regex(rx),
                good,
                bad,
                lambda text, rx=rx: re.fullmatch(rx, text) is not None,
            )
        )
    bitmask = lib.bitmask(1)
    texts = [set(tok.decode([t])) for t in range(vocab_size)]
    for name, compiled, good, bad, valid in cases:
        m = lib.matcher(compiled)
        ok = all(lib.accept(m, t) for t in tok.encode(good, add_special_tokens=False))
        if not ok or not lib.accepting(m):
            problems.append(f"{name}: a valid document was refused")
        m = lib.matcher(compiled)
        if all(lib.accept(m, t) for t in tok.encode(bad, add_special_tokens=False)) and (
            lib.accepting(m)
        ):
            problems.append(f"{name}: an invalid document was accepted")
        m, out = lib.matcher(compiled), []
        eos = set(tok.eos_token_ids)
        rng = random.Random(0)
        for _ in range(2000):
            lib.fill([m], bitmask)
            allowed = _allowed(bitmask[0], vocab_size).nonzero().flatten().tolist()
            if not allowed or eos & set(allowed):
                break  # the grammar accepts: a model would stop here (EOS is allowed)
            # Any allowed token, half the time one that closes or separates something: odd
            # tokens a model would rarely pick, but the document must still end up valid.
            closing = [t for t in allowed if _CLOSING & texts[t]]
            choice = rng.choice(closing if closing and rng.random() < 0.8 else allowed)
            if not lib.accept(m, choice):
                problems.append(f"{name}: a token in the mask was refused")
                break
            out.append(choice)
        text = tok.decode(out)
        if allowed and not eos & set(allowed):
            problems.append(f"{name}: a masked walk did not end in 2000 tokens")
        elif not valid(text):
            problems.append(f"{name}: a masked walk gave an invalid document: {text[:80]!r}")
    return problems


def mask_step_time(lib: Lib, tok: Any, batch: int, steps: int) -> dict[str, float]:
    """Seconds to fill `batch` matchers' masks per step, walking a valid document."""
    schema = SCHEMAS["nested+enum+array"]
    good = _compact(DOCS["nested+enum+array"][0])
    tokens = tok.encode(good, add_special_tokens=False)
    compiled = lib.compile_schema(schema)
    matchers = [lib.matcher(compiled) for _ in range(batch)]
    bitmask = lib.bitmask(batch)
    logits = torch.randn(batch, lib.vocab_size)
    fill_t, apply_t = [], []
    for step in range(min(steps, len(tokens))):
        t = time.perf_counter()
        lib.fill(matchers, bitmask)
        fill_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        lib.apply(logits, bitmask)
        apply_t.append(time.perf_counter() - t)
        for m in matchers:
            lib.accept(m, tokens[step])
    return {
        "fill_ms": statistics.median(fill_t) * 1e3,
        "apply_ms": statistics.median(apply_t) * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = load_tokenizer()
    vocab_size = tok.vocab_size
    print(f"tokenizer: {vocab_size} tokens, batch {args.batch}, torch threads 1")
    for cls in (XGrammar, LLGuidance):
        lib = cls(tok, vocab_size)
        print(f"\n== {lib.name}: tokenizer view {lib.init_s * 1e3:.0f} ms")
        for name, schema in SCHEMAS.items():
            s, _ = _timed(lambda lib=lib, schema=schema: lib.compile_schema(schema))
            print(f"  compile schema {name:<20} {s * 1e3:8.1f} ms")
        for name, (rx, _, _) in REGEXES.items():
            s, _ = _timed(lambda lib=lib, rx=rx: lib.compile_regex(rx))
            print(f"  compile regex  {name:<20} {s * 1e3:8.1f} ms")
        r = mask_step_time(lib, tok, args.batch, args.steps)
        print(
            f"  mask per step, {args.batch} matchers: fill {r['fill_ms']:.2f} ms, "
            f"apply {r['apply_ms']:.2f} ms (median)"
        )
        problems = correctness(lib, tok, vocab_size)
        print(f"  correctness: {'ok' if not problems else '; '.join(problems)}")


if __name__ == "__main__":
    main()
