"""Structured outputs in the engine: the grammar's mask inside the sampler, for the whole batch.

A tiny random Llama with SmolLM2's tokenizer (tiny_model_dir): its free output is noise, so
every valid document below is the grammar's doing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.guided import (
    MAX_CHOICES,
    MAX_SPEC_BYTES,
    GuidedSpec,
    GuidedSpecError,
    allocate_bitmask,
    allowed_tokens,
    closed_schema,
)
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}
JSON_SPEC = GuidedSpec("json_schema", json.dumps(SCHEMA))
REGEX_SPEC = GuidedSpec("regex", r"[0-9]{3}-(ab|cd)")
CHOICE_SPEC = GuidedSpec("choice", choices=("yes", "no", 'it "depends"'))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Iterator[LLMEngine]:
    eng = create_engine(EngineConfig(model=tiny_model_dir, num_kv_blocks=256, num_threads=1))
    yield eng
    eng.close()


def _prompt(engine: LLMEngine, text: str = "Answer in JSON:") -> list[int]:
    assert engine.tokenizer is not None
    return engine.tokenizer.encode(text)


def _text(engine: LLMEngine, ids: list[int]) -> str:
    assert engine.tokenizer is not None
    return engine.tokenizer.decode(ids)


def _greedy(spec: GuidedSpec | None, max_tokens: int = 60, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, guided=spec, **kw)  # type: ignore[arg-type]


def test_each_kind_constrains_greedy_and_sampled_output(engine: LLMEngine) -> None:
    prompts = [_prompt(engine)] * 5
    params = [
        _greedy(JSON_SPEC),
        SamplingParams(max_tokens=60, temperature=1.0, seed=7, guided=JSON_SPEC),
        _greedy(REGEX_SPEC),
        SamplingParams(max_tokens=60, temperature=1.5, seed=3, guided=CHOICE_SPEC),
        _greedy(GuidedSpec("json_object"), max_tokens=200),
    ]
    outs = engine.generate(prompts, params)
    for out in outs[:2]:
        assert out.finish_reason == "stop", _text(engine, out.new_token_ids)
        jsonschema.validate(json.loads(_text(engine, out.new_token_ids)), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-(ab|cd)", _text(engine, outs[2].new_token_ids))
    assert outs[2].finish_reason == "stop"
    assert _text(engine, outs[3].new_token_ids) in CHOICE_SPEC.choices
    # EOS ends the request (finish "stop") only once the grammar accepts.
    assert outs[3].new_token_ids[-1] in engine.eos_token_ids
    if outs[4].finish_reason == "stop":  # random weights may fill the object to max_tokens
        assert isinstance(json.loads(_text(engine, outs[4].new_token_ids)), dict)
    else:
        assert _text(engine, outs[4].new_token_ids).startswith("{")


def test_a_free_request_is_unchanged_by_constrained_neighbours(engine: LLMEngine) -> None:
    prompt = _prompt(engine, "Once upon a time")
    free = _greedy(None, max_tokens=24, ignore_eos=True)
    alone = engine.generate([prompt], free)[0].new_token_ids
    mixed = engine.generate(
        [prompt, _prompt(engine), _prompt(engine, "x"), prompt],
        [free, _greedy(JSON_SPEC), _greedy(REGEX_SPEC), _greedy(CHOICE_SPEC)],
    )
    assert mixed[0].new_token_ids == alone
    # ... and the constrained ones still match their grammars.
    jsonschema.validate(json.loads(_text(engine, mixed[1].new_token_ids)), SCHEMA)
    assert _text(engine, mixed[3].new_token_ids) in CHOICE_SPEC.choices


def test_a_resumed_request_continues_under_its_grammar(engine: LLMEngine) -> None:
    """Migration and remote prefill: the matcher is rebuilt from the tokens already produced."""
    prompt = _prompt(engine)
    whole = engine.generate([prompt], _greedy(JSON_SPEC))[0].new_token_ids
    k = len(whole) // 2
    engine.add_request("resumed", prompt, _greedy(JSON_SPEC), resume_token_ids=whole[:k])
    rest: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            rest += out.new_token_ids
    assert whole[:k] + rest == whole


def test_bad_specs_are_refused_before_anything_runs(engine: LLMEngine) -> None:
    compiler = engine.grammar_compiler()
    bad = [
        GuidedSpec("json_schema", '{"type": '),  # not JSON
        GuidedSpec("json_schema", '{"type": "objectx"}'),  # not a schema
        GuidedSpec("regex", "[a-"),  # doesn't parse
        GuidedSpec("regex", r"[^\s\S]"),  # matches nothing
        GuidedSpec("json_schema", json.dumps({"type": "string", "pattern": r"[^\s\S]"})),
        GuidedSpec("choice", choices=()),
        GuidedSpec("choice", choices=("a",) * (MAX_CHOICES + 1)),
        GuidedSpec("regex", "a" * (MAX_SPEC_BYTES + 1)),
        GuidedSpec("xml"),
    ]
    for spec in bad:
        with pytest.raises(GuidedSpecError):
            compiler.check(spec)
        with pytest.raises(GuidedSpecError):
            engine.add_request("bad", _prompt(engine), _greedy(spec))
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks
    compiler.check(JSON_SPEC)  # and good ones still compile


def test_closed_schema_and_bitmask_unpacking() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy
    bitmask = allocate_bitmask(2, 40)
    bitmask[0, 0] = (1 << 3) | -(1 << 31)  # bit 31: the sign bit of an int32
    bitmask[1, 1] = 1 << 2
    allowed = allowed_tokens(bitmask, 40)
    assert allowed[0].nonzero().flatten().tolist() == [3, 31]
    assert allowed[1].nonzero().flatten().tolist() == [34]
