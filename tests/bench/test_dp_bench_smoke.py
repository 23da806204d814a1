"""`splitserve bench dp`: the harness's pure parts, and one tiny real run checked for its shape
(JSON, plot, final line), never for its timings."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from splitserve.bench import dp_bench as dp
from splitserve.bench.cpus import cores_for
from splitserve.bench.workload import MIN_TOKEN_ID, ThroughputResult
from splitserve.cli import build_parser, main

FINAL_LINE = re.compile(r"dp_scaling_ratio: \d+\.\d\d")


def test_settings_and_workload():
    args = build_parser().parse_args(["bench", "dp", "--requests", "5", "--output-tokens", "7"])
    assert args.run is dp.run
    s = dp.settings_from_args(args)
    assert (s.requests, s.prompt_tokens, s.output_tokens, s.repeats, s.pin) == (5, 64, 7, 2, True)
    reqs = dp.workload(s, 1000)
    assert len(reqs) == 5 and len({r.prompt_token_ids for r in reqs}) == 5
    assert all(r.prompt_len == 64 and r.output_len == 7 for r in reqs)
    assert all(MIN_TOKEN_ID <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    assert reqs == dp.workload(s, 1000)  # seeded
    quick = dp.settings_from_args(build_parser().parse_args(["bench", "dp", "--quick"]))
    assert quick.requests == dp.QUICK.requests and quick.repeats == 1
    assert quick.quiet_wait_s == 0 and s.quiet_wait_s == dp.DPBenchSettings().quiet_wait_s > 0
    for bad in (["--repeats", "0"], ["--quiet-wait", "-1"]):
        with pytest.raises(ValueError):
            dp.settings_from_args(build_parser().parse_args(["bench", "dp", *bad]))


def test_core_scaling_measures_the_machine():
    # Ratios of timings on a shared machine: only their being real measurements is asserted.
    cpus = cores_for(2, os.sched_getaffinity(0))
    for on in (cpus[:1], cpus):
        assert 0 < dp.core_scaling(on, seconds=0.3) < math.inf
    args = build_parser().parse_args(["bench", "dp", "--no-probe"])
    assert dp.settings_from_args(args).probe_s == 0 and dp.DPBenchSettings().probe_s > 0


def made_up() -> dp.DPBenchResult:
    bench = dp.DPBenchResult("tiny", dp.DPBenchSettings(requests=4), ["--threads", "1"])
    bench.meshes[1] = dp.MeshRun(1, [ThroughputResult(256, 4.0), ThroughputResult(256, 3.2)])
    bench.meshes[2] = dp.MeshRun(
        2, [ThroughputResult(256, 2.0)], {"colocated-0": 2, "colocated-1": 2}, {"a": [0]}
    )
    bench.same_tokens = 4
    bench.core_scaling = [1.91, 1.85]
    return bench


def test_ratio_report_and_plot(tmp_path):
    bench = made_up()
    assert bench.meshes[1].tokens_per_s == 80.0  # the fastest run counts
    assert bench.scaling == pytest.approx(1.6)
    assert dp.final_line(bench) == "dp_scaling_ratio: 1.60"
    text = "\n".join(dp.report_lines(bench))
    assert "2 / 2" in text and "4/4" in text and ": met" in text
    assert "1.91x / 1.85x one core's rate" in text
    assert dp.result_json(bench)["target_met"] is True
    png = tmp_path / "dp.png"
    dp.write_plot(str(png), bench)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_json_plot_and_final_line(tmp_path, capsys):
    """The real thing, tiny: DP=1 then DP=2 meshes on the default model."""
    path, png = tmp_path / "dp.json", tmp_path / "dp.png"
    argv = ["bench", "dp", "--quick", "--json", str(path), "--plot", str(png)]
    assert main([*argv, "--log-dir", str(tmp_path / "logs"), "--kv-cache-mib", "64"]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert FINAL_LINE.fullmatch(last), last
    doc = json.loads(path.read_text())
    q = dp.QUICK
    assert [m["replicas"] for m in doc["meshes"]] == [1, 2]
    for m in doc["meshes"]:
        assert m["generated_tokens"] == q.requests * q.output_tokens
        assert m["tokens_per_s"] > 0 and len(m["seconds_per_repeat"]) == q.repeats
        assert len(m["others_cpu_fraction_per_run"]) == q.repeats
        assert sum(m["requests_per_replica"].values()) == q.requests * q.repeats
        assert len(m["requests_per_replica"]) == len(m["cores"]) == m["replicas"]
        assert {"router", "client"} <= set(m["cpu_seconds"])
    two = doc["meshes"][1]
    if len(os.sched_getaffinity(0)) >= 2:  # one core each
        assert sorted(c for cores in two["cores"].values() for c in cores) == sorted(
            cores_for(2, os.sched_getaffinity(0))
        )
    assert doc["same_tokens"] == doc["requests"] == q.requests  # greedy: DP changes nothing
    assert doc["dp_scaling_ratio"] == pytest.approx(
        two["tokens_per_s"] / doc["meshes"][0]["tokens_per_s"]
    )
    assert set(doc["settings"]) >= {"requests", "prompt_tokens", "output_tokens", "repeats"}
    assert len(doc["core_scaling"]) == 2 and all(x > 0 for x in doc["core_scaling"])
    assert "--threads" in doc["engine_flags"]
    assert doc["engine_flags"][doc["engine_flags"].index("--threads") + 1] == "1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
