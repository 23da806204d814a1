"""The pipeline benchmark end to end on a tiny checkpoint: the shape of its output, no timings.

One `splitserve bench pipeline --quick` run (P=2, M=1 and 2, four sequences, two measured
steps, the P=1 baseline, stages pinned) on the tiny random Llama, with JSON and plot; plus the
compute-balanced layer counts on SmolLM2's real shape.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from splitserve.bench import pipeline_bench as pb
from splitserve.cli import build_parser
from splitserve.engine.config import ModelConfig

SMOLLM2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 2048, 1e-5, 1e4, None, True)
FINAL_LINE = re.compile(rf"^{pb.FINAL_KEY}: \d+\.\d\d$", re.MULTILINE)


def test_layers_are_balanced_by_compute():
    # The LM head weighs about eight SmolLM2 layers and the embedding nothing.
    assert pb.compute_balanced_layers(SMOLLM2, 2) == (19, 11)
    four = pb.compute_balanced_layers(SMOLLM2, 4)
    assert sum(four) == 30 and four[-1] == min(four) and len(four) == 4
    assert pb.ideal(8, 2) == pytest.approx(8 / 9)
    assert pb.ideal(1, 4) == pytest.approx(1 / 4)


def test_flags_become_settings():
    args = build_parser().parse_args(
        ["bench", "pipeline", "--stages", "2,3", "--micro-batches", "1,4", "--layers", "3=2,1,1"]
    )
    s = pb.settings_from_args(args)
    assert s.stages == (2, 3) and s.micro_batches == (1, 4)
    assert s.layers == ((3, (2, 1, 1)),) and s.pin and s.baseline
    with pytest.raises(ValueError):
        pb.settings_from_args(build_parser().parse_args(["bench", "pipeline", "--layers", "2:1"]))


def test_quick_run_writes_the_report_json_and_plot(tiny_model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "pp.json", tmp_path / "pp.png"
    flags = f"--quick --model {tiny_model_dir} --layers 2=3,1 --json {out_json} --plot {out_png}"
    args = build_parser().parse_args(["bench", "pipeline", *flags.split()])
    mask = os.sched_getaffinity(0)
    assert args.run(args) == 0
    assert os.sched_getaffinity(0) == mask  # the pinning was undone
    text = capsys.readouterr().out
    assert FINAL_LINE.search(text.strip().splitlines()[-1])
    assert "stage0" in text and "ideal" in text

    doc = json.loads(out_json.read_text())
    assert doc["settings"]["stages"] == [2] and doc["settings"]["micro_batches"] == [1, 2]
    assert doc["baseline_tokens_per_s"] > 0
    assert [(r["stages"], r["micro_batches"]) for r in doc["runs"]] == [(2, 1), (2, 2)]
    for r in doc["runs"]:
        assert r["layers"] == [[0, 3], [3, 4]]
        assert len(r["busy"]) == len(r["cpu"]) == len(r["busy_vs_ideal"]) == 2
        assert all(0 < b <= 1.0 for b in r["busy"])
        assert r["decode_tokens"] == 4 * 2  # every measured step decoded the whole batch
        assert r["ideal"] == pytest.approx(r["micro_batches"] / (r["micro_batches"] + 1))
    assert len(doc["cores"]["2"]) == 2
    assert doc[pb.FINAL_KEY] == pytest.approx(
        min(b / doc["runs"][1]["ideal"] for b in doc["runs"][1]["busy"])
    )
    assert out_png.stat().st_size > 10_000
