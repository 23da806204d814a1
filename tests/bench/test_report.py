"""The pieces every benchmark's report is made of (bench/report.py): tables, number formats,
statistics, and the ending every benchmark shares: report, JSON, plot, final line last."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import pytest

from splitserve.bench import report


def test_latency_stats():
    st = report.LatencyStats.of([0.4, 0.1, 0.3, 0.2])
    assert (st.n, st.min, st.max) == (4, 0.1, 0.4)
    assert st.mean == pytest.approx(0.25) and st.median == pytest.approx(0.25)
    assert report.LatencyStats.of([]).n == 0


def test_percentile_by_rank():
    assert report.percentile([0.3, 0.1, 0.2], 0.99) == 0.3  # a handful: p99 is the slowest
    values = [i / 1000 for i in range(1, 201)]  # 0.001 .. 0.200
    assert report.percentile(values, 0.99) == 0.199  # rank floor(0.99 x 200) = 198
    assert report.percentile(values, 0.5) == 0.101
    assert report.percentile([], 0.99) == 0.0


def test_table_pads_columns_and_aligns_numbers_right():
    lines = report.format_table(["name", "tok/s"], [["a", "1.0"], ["longer", "100.5"]])
    assert lines == ["name    tok/s", "a         1.0", "longer  100.5"]


def test_number_formats_and_the_final_line():
    assert report.pct(0.1234) == "12.3%" and report.pct(None) == "-"
    assert report.ms(1.5) == "1,500" and report.mib(3 * 2**20) == "3 MiB"
    assert report.times(1.5) == "1.50x"
    assert report.final_line("x_ratio", 1.006) == "x_ratio: 1.01"
    assert report.final_line("ok", True) == "ok: true"
    assert report.final_line("ok", False) == "ok: false"


def test_load_note_flags_a_machine_busy_before_the_run():
    assert report.load_note({}) == ""
    calm = report.load_note({"a": 0.5, "b": 1.5}, busy_cpus=2)
    assert calm == "; 1-min load average at phase starts 0.5-1.5"
    busy = report.load_note({"a": 1.5, "b": 0.5}, busy_cpus=2)
    assert busy == calm + " (busy before the run started: expect noise)"
    assert report.load_note({"a": 1.5}) == "; 1-min load average at phase starts 1.5-1.5"


@dataclass
class Settings:
    requests: int = 4


def test_json_document_has_the_settings_and_the_machine():
    doc = report.json_document(Settings(), results=[1], final_key=0.5)
    assert doc["settings"] == {"requests": 4}
    assert {"cpu", "logical_cpus", "torch_threads", "python"} <= set(doc["machine"])
    assert doc["results"] == [1] and doc["final_key"] == 0.5


def _draw(fig) -> None:
    fig.subplots(1, 1).bar(["a"], [1.0])


def test_finish_writes_what_was_asked_and_ends_with_the_final_line(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    args = argparse.Namespace(json=str(js), plot=str(png))
    report.finish(
        args,
        ["table", "", "kv: 1"],
        "bench_ratio: 2.00",
        lambda: {"bench_ratio": 2.0},
        lambda path: report.save_plot(path, (3, 2), _draw),
    )
    assert capsys.readouterr().out.splitlines() == ["table", "", "kv: 1", "bench_ratio: 2.00"]
    assert json.loads(js.read_text()) == {"bench_ratio": 2.0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unasked = argparse.Namespace(json=None, plot=None)
    report.finish(unasked, ["x"], "y: 1.00", lambda: pytest.fail("no --json: no document"))
    assert capsys.readouterr().out == "x\ny: 1.00\n"


def test_no_matplotlib_means_no_plot_and_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a missing package does
    png = tmp_path / "r.png"
    assert report.save_plot(str(png), (3, 2), _draw) is False
    assert not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
