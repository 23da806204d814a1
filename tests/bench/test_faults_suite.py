"""`splitserve bench faults`, run for real in its quick form on the tiny checkpoint: every kind
of service killed, stopped or drained under load, Redis killed and restarted, unauthenticated
calls, overload and expired deadlines, each on real processes. What is asserted is what the
issue holds the mesh to: no request hung or lost, no KV block leaked, streams moved off a
failed worker identical to the no-failure run, refusals refused, the mesh whole again after
every fault. Timings are reported, never asserted (the machine is shared and noisy)."""

from __future__ import annotations

import json

import pytest

from splitserve.bench import faults
from splitserve.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("faults")
    argv = ["bench", "faults", "--quick", "--model", tiny_model_dir]
    argv += ["--json", str(out / "rows.json"), "--markdown", str(out / "table.md")]
    argv += ["--log-dir", str(out / "logs")]
    code = main(argv)
    table = (out / "table.md").read_text()
    assert table.startswith("| scenario |"), table
    loaded = json.loads((out / "rows.json").read_text())
    by_name = {r["scenario"]: r for r in loaded}
    assert code == 0, table
    return by_name


def row(rows: dict[str, dict], prefix: str) -> dict:
    matches = [r for name, r in rows.items() if name.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(rows))
    return matches[0]


def test_nothing_hung_lost_or_leaked_anywhere(rows):
    for name, r in rows.items():
        assert (r["hung"], r["lost"], r["leaked_blocks"]) == (0, 0, 0), name


@pytest.mark.parametrize(
    "scenario",
    [
        "decode SIGKILL mid-stream",
        "decode SIGSTOP mid-stream",
        "decode SIGKILL before first token",
        "prefill SIGKILL",
        "prefill SIGSTOP",
        "kvstore SIGKILL",
        "kvstore SIGSTOP",
        "Redis SIGKILL",
    ],
)
def test_every_stream_survives_the_fault_with_the_same_tokens(rows, scenario):
    r = row(rows, scenario)
    assert r["completed"] == r["sent"] == r["identical"], r
    assert r["recovery_s"] is not None, r  # the mesh was whole again afterwards


@pytest.mark.parametrize("scenario", ["decode SIGKILL mid-stream", "decode SIGSTOP mid-stream"])
def test_streams_on_the_failed_decoder_moved(rows, scenario):
    assert row(rows, scenario)["migrations"] >= 1


def test_the_router_drain_ends_long_streams_with_an_error(rows):
    r = row(rows, "router SIGTERM")
    assert r["clean_errors"] + r["completed"] == r["sent"]
    assert r["clean_errors"] >= 1, r  # 2 s of drain is far shorter than the streams
    assert r["recovery_s"] is not None, r  # restarted by the supervision


@pytest.mark.parametrize(
    ("scenario", "status"),
    [
        ("rogue Register, no client certificate", "UNAVAILABLE"),  # the handshake fails
        ("kvstore Put, no client certificate", "UNAVAILABLE"),
        ("rogue Register, a kvstore's certificate", "PERMISSION_DENIED"),
        ("generation without the API key", "UNAUTHENTICATED"),
    ],
)
def test_strangers_are_refused(rows, scenario, status):
    r = row(rows, scenario)
    assert r["clean_errors"] == 1 and r["notes"] == [status], r


def test_overload_sheds_with_429_and_serves_what_it_admits(rows):
    r = row(rows, "overload")
    assert r["completed"] >= 1 and r["clean_errors"] >= 1, r
    assert r["completed"] + r["clean_errors"] == r["sent"], r
    assert any(n.startswith("Retry-After 1") for n in r["notes"]), r


def test_expired_deadlines_get_504(rows):
    r = row(rows, "deadline")
    assert r["completed"] == 0 and r["clean_errors"] == r["sent"], r
    assert "504" in r["notes"][0], r


def test_the_table_has_a_row_per_scenario(rows):
    expected = len(faults.SCENARIOS) + 1 + 4 + 2  # + reference on long prompts, security, pool
    assert len(rows) == expected, list(rows)
