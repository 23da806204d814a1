"""`splitserve bench linear --quick` on the default model: the harness runs, the table and the
final line are printed, the JSON has every backend, and every backend agrees with nn.Linear.
No timing is asserted."""

from __future__ import annotations

import json
import re

from splitserve.bench import linear_bench as lb
from splitserve.cli import build_parser


def test_quick_run(smollm2_path, tmp_path, capsys):
    out = tmp_path / "linear.json"
    args = build_parser().parse_args(
        ["bench", "linear", "--quick", "--model", smollm2_path, "--json", str(out)]
    )
    assert args.run is lb.run
    assert lb.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"{lb.FINAL_KEY}: \d+\.\d\d", lines[-1])
    assert any(line.split()[:1] == ["16"] for line in lines)
    data = json.loads(out.read_text())
    assert data["rows"] == [1, 16]
    assert set(data["seconds"]) == {
        "blocks", "onednn", "torch", "blocks-int8", "blocks-int8-vnni", "int8", "int4"
    }  # fmt: skip
    assert all(v > 0 for per in data["seconds"].values() for v in per.values())
    # float32 throughout: only the order of the additions differs
    errors = data["max_abs_err"]
    assert max(errors[k] for k in ("blocks", "onednn", "torch")) < 1e-3
    # quantized at load: their rounding shows, but stays a rounding
    assert 1e-3 < errors["int8"] < 5 and 1e-3 < errors["int4"] < 5
    assert 1e-3 < errors["blocks-int8"] < 5  # int8 activations: a rounding too
    # with AMX (16 rows here) or without: the same numbers
    assert errors["blocks-int8-vnni"] == errors["blocks-int8"]
    assert any(line.startswith("int8 activations (blocks-int8) and quantized") for line in lines)
