"""The pipeline benchmark end to end on a tiny checkpoint: the shape of its output, no timings.

One `splitserve bench pipeline --quick` run (P=2, M=1 and 2, four sequences, two measured
steps, the P=1 baseline, stages pinned) on the tiny random Llama, with JSON and plot; plus the
compute-balanced layer counts on SmolLM2's real shape.
"""

from __future__ import annotations

import itertools
import json
import os
import re

import pytest
from models import SMOLLM2

from splitserve.bench import pipeline_bench as pb
from splitserve.cli import build_parser

FINAL_LINE = re.compile(rf"^{pb.FINAL_KEY}: \d+\.\d\d$", re.MULTILINE)


def test_layers_are_balanced_by_compute():
    # The LM head weighs about eight SmolLM2 layers and the embedding nothing.
    assert pb.compute_balanced_layers(SMOLLM2, 2) == (19, 11)
    four = pb.compute_balanced_layers(SMOLLM2, 4)
    assert sum(four) == 30 and four[-1] == min(four) and len(four) == 4
    assert pb.ideal(8, 2) == pytest.approx(8 / 9)
    assert pb.ideal(1, 4) == pytest.approx(1 / 4)
    assert pb.ideal(8, 4, "overlap") == 1.0  # no bubble: every stage always has a group
    assert pb.ideal(2, 4, "overlap") == pytest.approx(2 / 4)


def _run(layers, cpu):
    bounds = [sum(layers[:k]) for k in range(len(layers) + 1)]
    return pb.Run(len(layers), 8, list(itertools.pairwise(bounds)), 1.0, 1, 1, cpu, cpu, 0.0)


def test_a_pilot_prices_a_layer_and_the_head():
    # As measured on a 2-core Xeon: 9,10,9,2 at M=8 used 0.40/0.43/0.40/0.25 of a core.
    per_layer, head = pb.measured_costs(_run([9, 10, 9, 2], [0.40, 0.43, 0.40, 0.25]))
    assert per_layer == pytest.approx(1.23 / 28)
    assert head == pytest.approx(0.25 - 2 * 1.23 / 28)
    # 8,8,9,5 and 8,9,9,4 have the same costliest stage (9 layers); the first is more even.
    assert pb.split_by_cost(30, 4, per_layer, head) == (8, 8, 9, 5)
    assert pb.split_by_cost(30, 2, 0.0447, 0.238) == (18, 12)
    # A free head: layers alone, stage 0 (which also samples) never the largest.
    assert pb.split_by_cost(10, 3, 1.0, 0.0) == (3, 4, 3)
    # A head dearer than all layers but one per stage: the last stage keeps one layer.
    assert pb.split_by_cost(6, 2, 1.0, 100.0) == (5, 1)
    # A last stage cheaper than its layers (noise) doesn't price the head below zero.
    assert pb.measured_costs(_run([2, 2], [0.5, 0.3]))[1] == 0.0
    with pytest.raises(ValueError):
        pb.split_by_cost(3, 4, 1.0, 1.0)


def test_flags_become_settings():
    args = build_parser().parse_args(
        ["bench", "pipeline", "--stages", "2,3", "--micro-batches", "1,4", "--layers", "3=2,1,1"]
    )
    s = pb.settings_from_args(args)
    assert s.stages == (2, 3) and s.micro_batches == (1, 4)
    assert s.schedules == ("overlap", "step")
    with pytest.raises(ValueError, match="schedules"):
        pb.settings_from_args(build_parser().parse_args(["bench", "pipeline", "--schedules", "x"]))
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
    assert [(r["schedule"], r["micro_batches"]) for r in doc["runs"]] == [
        ("overlap", 1),
        ("overlap", 2),
        ("step", 1),
        ("step", 2),
    ]
    for r in doc["runs"]:
        assert r["layers"] == [[0, 3], [3, 4]]
        assert len(r["busy"]) == len(r["cpu"]) == len(r["busy_vs_ideal"]) == 2
        assert all(0 < b <= 1.0 for b in r["busy"])
        assert r["decode_tokens"] == 4 * 2  # every measured step decoded the whole batch
        step_ideal = r["micro_batches"] / (r["micro_batches"] + 1)
        best = min(1.0, r["micro_batches"] / 2) if r["schedule"] == "overlap" else step_ideal
        assert r["ideal"] == pytest.approx(best)
        assert r["busy_vs_step_ideal"][0] == pytest.approx(r["busy"][0] / step_ideal)
    assert len(doc["cores"]["2"]) == 2
    overlap_m2, step_m2 = doc["runs"][1], doc["runs"][3]
    assert doc[pb.FINAL_KEY] == pytest.approx(
        min(b / overlap_m2["ideal"] for b in overlap_m2["busy"])
    )
    assert doc["final_by_schedule"]["step"] == pytest.approx(
        min(b / step_m2["ideal"] for b in step_m2["busy"])
    )
    assert "step schedule: " + pb.FINAL_KEY in text
    assert out_png.stat().st_size > 10_000


def test_quick_run_without_layers_runs_a_pilot(tiny_model_dir, tmp_path, capsys):
    out_json = tmp_path / "pp.json"
    flags = f"--quick --no-baseline --model {tiny_model_dir} --json {out_json}"
    args = build_parser().parse_args(["bench", "pipeline", *flags.split()])
    assert args.run(args) == 0
    assert "split by parameters" in capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    pilot = doc["pilots"]["2"]
    assert pilot["run"]["micro_batches"] == 2  # the largest M
    assert pilot["per_layer_cpu"] > 0 and pilot["head_cpu"] >= 0
    assert sum(pilot["layers"]) == 4 and min(pilot["layers"]) >= 1
    ends = [b for _, b in doc["runs"][0]["layers"]]
    assert ends == [sum(pilot["layers"][: k + 1]) for k in range(2)]  # what was measured
