"""`splitserve bench handoff`: the bare-gRPC baseline and one quick run on the tiny model."""

from __future__ import annotations

import json
import re

import pytest

from splitserve.bench import kv_handoff
from splitserve.cli import build_parser

FINAL_LINE = re.compile(r"^kv_handoff_ratio_vs_grpc: \d+\.\d\d$")


def test_the_grpc_baseline_moves_bytes():
    assert kv_handoff.grpc_ceiling(8_000_000, runs=2) > 1.0  # MB/s, not a timing target


@pytest.mark.parametrize("bad", [["--prompts", "0"], ["--prompt-tokens", "0"], ["--probe-mb", "0"]])
def test_bad_sizes_are_refused(bad):
    args = build_parser().parse_args(["bench", "handoff", *bad])
    with pytest.raises(ValueError, match="at least 1"):
        args.run(args)


@pytest.mark.slow
def test_quick_run_end_to_end(tiny_model_dir, tmp_path, capsys):
    """A real disaggregated mesh (mutual TLS): every prompt's KV is pulled by the decode worker,
    and the report says how fast against the same run's bare gRPC."""
    out = tmp_path / "handoff.json"
    argv = ["bench", "handoff", "--quick", "--model", tiny_model_dir, "--json", str(out)]
    args = build_parser().parse_args(argv)
    assert args.run(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert FINAL_LINE.match(printed[-1]), printed[-1]
    doc = json.loads(out.read_text())
    assert doc["transfers"] == 2 and doc["mb_each"] > 0 and doc["mb_per_s"] > 0
    assert doc["grpc_mb_per_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["mb_per_s"] / doc["grpc_mb_per_s"])
    # Both paths ran, each with its own mesh: on this host the first went through a
    # shared-memory file, byte for byte; the second streamed every byte.
    shm, streamed = doc["paths"]["shm"], doc["paths"]["grpc"]
    assert shm["transfers"] == streamed["transfers"] == 2
    assert shm["shm_mb_each"] == pytest.approx(shm["mb_each"]) and shm["mb_each"] > 0
    assert streamed["shm_mb_each"] == 0 and streamed["mb_each"] == pytest.approx(shm["mb_each"])
    assert doc["mb_per_s"] == shm["mb_per_s"]
