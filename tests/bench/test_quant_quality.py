"""`splitserve bench quant`: its metrics, and one small comparison on the tiny checkpoint."""

from __future__ import annotations

import math

import pytest

from splitserve.bench import quant_quality as qq
from splitserve.model.loader import open_checkpoint


def test_perplexity_and_prefix_agreement():
    assert qq.perplexity([[math.log(0.5)] * 3, [math.log(0.5)]]) == pytest.approx(2.0)
    assert qq.same_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert qq.same_prefix([1, 2], [1, 2]) == 2


def test_unknown_option_names_the_choices(capsys, tiny_model_dir):
    parser_args = type(
        "A",
        (),
        dict(
            model=tiny_model_dir,
            text=qq.DEFAULT_TEXT,
            options="int3",
            prompts=2,
            new_tokens=2,
            prompt_tokens=8,
            chunk=16,
            chunks=1,
            threads=None,
            quick=False,
            json=None,
        ),
    )()
    assert qq.run(parser_args) == 1
    assert "unknown option(s) int3; choose from int8, int4 g32" in capsys.readouterr().out


def test_compare_scores_the_reference_perfectly_and_an_option_against_it(tiny_model_dir):
    ckpt = open_checkpoint(tiny_model_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    args = type("A", (), dict(quick=False, chunks=1, chunk=32, prompts=2, prompt_tokens=8,
                              new_tokens=4))()  # fmt: skip
    work = qq.make_workload(ckpt.tokenizer, text, args)
    assert len(work.chunks) == 1 and len(work.chunks[0]) == 32 and len(work.prompts) == 2
    rows = qq.compare(ckpt, [qq.Option("int8", {"quantization": "int8"})], work, None)
    ref, int8 = rows
    assert ref.ppl_change == 0 and ref.agreement == 1 and ref.identical == 2
    assert int8.name == "int8" and int8.weight_bytes < ref.weight_bytes / 3
    assert 0 <= int8.agreement <= 1 and 0 < int8.mean_abs_dlogprob < 1
    assert abs(int8.ppl_change) < 0.1
    lines = qq.report(ckpt.path, "text", work, rows)
    assert lines[1].split()[:3] == ["option", "weights", "MB"] and len(lines) == 4
