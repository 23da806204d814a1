"""`splitserve bench serve`: the arithmetic (arrivals, percentiles, TPOT, goodput), the
workloads and request bodies, the command line, the report from made-up runs (no processes,
no timing asserts), and one quick run end to end against a real colocated mesh on the tiny
model through `--compare` (real processes, real HTTP, real SSE).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics

import pytest

from splitserve.bench import serve
from splitserve.bench import serve_client as sc
from splitserve.cli import build_parser


# ---- arrivals ------------------------------------------------------------------------------
def test_arrivals_all_at_once_for_an_infinite_rate():
    assert sc.arrival_offsets(5, math.inf, "poisson", random.Random(0)) == [0.0] * 5


def test_constant_arrivals_are_evenly_spaced():
    offsets = sc.arrival_offsets(5, 4.0, "constant", random.Random(0))
    assert offsets == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_poisson_arrivals_have_exponential_gaps_at_the_rate():
    offsets = sc.arrival_offsets(20_000, 8.0, "poisson", random.Random(1))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.03)
    # exponential: the standard deviation equals the mean (a constant process has none)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert offsets == sc.arrival_offsets(20_000, 8.0, "poisson", random.Random(1))


@pytest.mark.parametrize(("rate", "process"), [(0.0, "poisson"), (-1.0, "constant"),
                                               (1.0, "gamma")])  # fmt: skip
def test_arrivals_reject_bad_rates_and_processes(rate, process):
    with pytest.raises(ValueError):
        sc.arrival_offsets(3, rate, process, random.Random(0))


# ---- statistics ----------------------------------------------------------------------------
def _result(ttft, e2e, tokens, ok=True, itl=(), source="usage"):
    return sc.RequestResult(
        ok=ok, start=0.0, ttft=ttft, e2e=e2e, output_tokens=tokens, itl=list(itl),
        token_source=source, error="" if ok else "HTTP 500: boom",
    )  # fmt: skip


def test_tpot_is_the_time_after_the_first_token_per_later_token():
    assert _result(0.1, 1.1, 11).tpot == pytest.approx(0.1)
    assert _result(0.1, 0.1, 1).tpot is None


def test_distribution_uses_the_report_percentile_in_ms():
    d = sc.distribution([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d["mean"] == pytest.approx(50.5)
    assert d["p50"] == pytest.approx(51) and d["p90"] == pytest.approx(91)
    assert d["p99"] == pytest.approx(100)
    assert sc.distribution([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_summary_counts_throughput_and_goodput():
    results = [
        _result(0.05, 0.55, 11, itl=[0.05] * 10),  # TTFT 50 ms, TPOT 50 ms: meets both
        _result(0.30, 0.80, 11),  # TTFT 300 ms: misses the TTFT SLO
        _result(0.05, 2.05, 11),  # TPOT 200 ms: misses the TPOT SLO
        _result(0.05, 0.05, 1),  # one token: no TPOT, meets the TTFT SLO
        _result(0.0, 0.0, 0, ok=False),
    ]
    s = sc.summarize(results, 2.0, sc.SLO(ttft_ms=100, tpot_ms=100))
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["errors"] == ["HTTP 500: boom"]
    assert s["output_tokens"] == 34 and s["output_throughput"] == pytest.approx(17.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(200.0)
    assert s["itl_ms"]["p50"] == pytest.approx(50.0)
    assert s["output_tokens_counted_by"] == "usage"
    no_slo = sc.summarize(results, 2.0, sc.SLO())
    assert no_slo["goodput"] is None and no_slo["good_requests"] is None
    mixed = sc.summarize([_result(0.1, 0.2, 2), _result(0.1, 0.2, 2, source="chunks")], 1, sc.SLO())
    assert mixed["output_tokens_counted_by"] == "chunks/usage"


def test_slo_on_ttft_only_ignores_tpot():
    slo = sc.SLO(ttft_ms=100)
    assert slo.met_by(_result(0.05, 10.0, 2)) and not slo.met_by(_result(0.2, 0.3, 2))
    assert not slo.met_by(_result(0.0, 0.0, 0, ok=False))


# ---- workloads and request bodies ----------------------------------------------------------
def test_datasets_are_deterministic_and_shaped_as_named():
    rnd = sc.DatasetSpec("random", num_requests=6, input_len=20, range_ratio=0.5)
    convs = sc.make_dataset(rnd, seed=3)
    assert convs == sc.make_dataset(rnd, seed=3) and convs != sc.make_dataset(rnd, seed=4)
    assert all(len(c.turns) == 1 and not c.prefix for c in convs)
    assert len({c.turns[0].text.split(":")[0] for c in convs}) == 6  # every prompt its own tag
    assert all(10 <= len(c.turns[0].text.split()) - 2 <= 30 for c in convs)
    shared = sc.make_dataset(sc.DatasetSpec("shared-prefix", 5, prefix_len=50, suffix_len=4), 0)
    assert len({c.prefix for c in shared}) == 1 and len(shared[0].prefix.split()) == 52
    assert len({c.turns[0].text for c in shared}) == 5
    chat = sc.make_dataset(sc.DatasetSpec("chat", 2, turns=3, output_len=7), 0)
    assert all(len(c.turns) == 3 and all(t.max_tokens == 7 for t in c.turns) for c in chat)
    with pytest.raises(ValueError):
        sc.DatasetSpec("sharegpt")


def test_request_bodies_carry_the_history_and_the_stream_options():
    conv = sc.Conversation((sc.Turn("hello", 5), sc.Turn("again", 6)), prefix="SYS")
    chat = sc.Endpoint("x", "http://h/v1", "m", "chat")
    body = sc.request_body(chat, conv, ["reply one"], 1)
    assert body["messages"] == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "reply one"},
        {"role": "user", "content": "again"},
    ]
    assert body["max_tokens"] == 6 and body["stream"] and body["ignore_eos"]
    assert body["stream_options"] == {"include_usage": True}
    comp = sc.Endpoint("x", "http://h/v1", "m", "completions", ignore_eos=False)
    first = sc.request_body(comp, conv, [], 0)
    assert first["prompt"] == "SYShello" and "ignore_eos" not in first
    assert sc.request_body(comp, conv, [" r1"], 1)["prompt"].endswith(
        "User: hello\nAssistant: r1\nUser: again\nAssistant:"
    )


# ---- the command line ----------------------------------------------------------------------
def _settings(*argv):
    return serve.settings_from_args(build_parser().parse_args(["bench", "serve", *argv]))


def test_load_points_and_request_counts_from_the_flags():
    s = _settings("--concurrency", "1,8,32", "--dataset", "random,shared-prefix")
    assert [ld.concurrency for ld in s.loads] == [1, 8, 32]
    assert [s.requests_for(ld) for ld in s.loads] == [4, 16, 64]
    one_wave = _settings("--concurrency", "1,8,32", "--waves", "1")
    assert [one_wave.requests_for(ld) for ld in one_wave.loads] == [4, 8, 32]
    assert [d.name for d in s.datasets] == ["random", "shared-prefix"]
    s = _settings("--request-rate", "2,inf", "--concurrency", "4", "--num-requests", "10")
    assert [(ld.rate, ld.concurrency) for ld in s.loads] == [(2.0, 4), (math.inf, 4)]
    assert [ld.label for ld in s.loads] == ["2/s c=4", "c=4"]
    assert s.requests_for(s.loads[0]) == 10
    assert [ld.label for ld in _settings("--request-rate", "3").loads] == ["3/s"]
    assert _settings().loads == (serve.LoadPoint(concurrency=1),)


@pytest.mark.parametrize(
    "argv",
    [["--concurrency", "0"], ["--concurrency", "a"], ["--request-rate", "-1"],
     ["--dataset", "sharegpt"], ["--servers", "vllm"]],
)  # fmt: skip
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", *argv])


def test_bad_values_are_value_errors():
    with pytest.raises(ValueError):
        _settings("--num-requests", "0")
    with pytest.raises(ValueError):
        _settings("--slo-ttft-ms", "-5")
    with pytest.raises(ValueError):
        _settings("--waves", "0")


def test_llama_server_context_fits_the_longest_request_in_every_slot():
    s = _settings("--concurrency", "1,8", "--dataset", "random,shared-prefix",
                  "--prefix-len", "1000", "--output-len", "100")  # fmt: skip
    slots, per_slot = serve.llama_context(s)
    assert slots == 8 and per_slot % 256 == 0
    assert per_slot >= 2 * (1000 + 32) + 100


def test_a_missing_llama_server_is_named_not_raised(tmp_path):
    binary, why = serve.find_llama_server(str(tmp_path / "nope"))
    assert binary is None and "not an executable" in why
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    binary, why = serve.find_llama_server(str(broken))
    assert binary is None and "does not run" in why
    broken.write_text("#!/bin/sh\necho 'version: 1234 (abc)'\n")
    assert serve.find_llama_server(str(broken)) == (str(broken), "")
    assert serve.llama_server_version(str(broken)) == "version: 1234 (abc)"


def test_engine_use_is_the_step_counter_delta_over_the_cell():
    use = serve.engine_use({"w": (10.0, 1.0)}, {"w": (30.0, 2.0), "v": (4.0, 0.2)}, 2.0)
    assert use["w"] == pytest.approx({"steps": 20, "step_ms_mean": 50.0, "busy_fraction": 0.5})
    assert use["v"] == pytest.approx({"steps": 4, "step_ms_mean": 50.0, "busy_fraction": 0.1})


# ---- the report ----------------------------------------------------------------------------
def _run(name, tok_s, ttft_ms):
    load = serve.LoadPoint(concurrency=8)
    summary = sc.summarize([_result(ttft_ms / 1000, 1.0, 10)], 1.0, sc.SLO(ttft_ms=100))
    summary["output_throughput"] = tok_s
    return serve.ServerRun(name, name, "m", [serve.Cell("random", load, summary)])


def test_ratios_are_against_llama_server_and_the_final_line_says_so():
    runs = [_run("colocated", 50.0, 40), _run("disaggregated", 25.0, 80),
            _run("llama-server", 100.0, 20)]  # fmt: skip
    rows = serve.ratio_rows(runs, serve.baseline_of(runs))
    assert [r[:4] for r in rows] == [
        ["random c=8", "colocated", "0.50x", "2.00x"],
        ["random c=8", "disaggregated", "0.25x", "4.00x"],
    ]
    assert serve.final(runs) == "serve_throughput_ratio_vs_llama_server: 0.50"
    lines = serve.report_lines(serve.ServeSettings(slo_ttft_ms=100), runs, 2)
    assert any("goodput" in ln for ln in lines)
    skipped = [*runs[:2], serve.ServerRun("llama-server", skipped="not built")]
    assert serve.final(skipped) == "serve_disagg_throughput_ratio_vs_colocated: 0.50"
    assert "llama-server: skipped (not built)" in serve.report_lines(serve.ServeSettings(),
                                                                     skipped, 2)  # fmt: skip


# ---- end to end ----------------------------------------------------------------------------
def test_quick_compare_against_a_real_colocated_mesh(tiny_model_dir, tmp_path, capsys):
    """`--compare --servers colocated --quick`: the launcher's mesh (mutual TLS, API key) on the
    tiny model, three datasets at two loads, streamed over HTTP; every request completes with
    the exact output length (ignore_eos), counted from the server's usage."""
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = [
        "bench", "serve", "--compare", "--servers", "colocated", "--quick",
        "--model", tiny_model_dir, "--threads", "1", "--kv-cache-mib", "32",
        "--concurrency", "1,4", "--dataset", "random,shared-prefix,chat",
        "--slo-ttft-ms", "60000", "--warmup", "1", "--json", str(out), "--plot", str(png),
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.run(args) == 0
    assert re.fullmatch(r"serve_output_tokens_per_s: \d+\.\d\d", capsys.readouterr().out.strip()
                        .splitlines()[-1])  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["threads"] == 1 and doc["machine"]["logical_cpus"] >= 1
    cells = doc["servers"]["colocated"]["cells"]
    assert [(c["dataset"], c["load"]["concurrency"]) for c in cells] == [
        (d, c) for d in ("random", "shared-prefix", "chat") for c in (1, 4)
    ]
    for c in cells:
        turns = 2 if c["dataset"] == "chat" else 1
        assert c["requests"] == c["completed"] == 4 * turns and c["failed"] == 0
        assert c["output_tokens"] == 8 * c["completed"]  # max_tokens 8, EOS ignored
        assert c["output_tokens_counted_by"] == "usage"
        assert c["good_requests"] == c["completed"]  # a 60 s TTFT SLO is met by all
        assert c["prompt_tokens"] > 0
        assert c["output_throughput"] > 0 and c["request_throughput"] > 0
        for r in c["per_request"]:
            assert r["ok"] and r["output_tokens"] == 8 and r["chunks"] >= 1
            assert 0 < r["ttft_ms"] <= r["e2e_ms"] <= 1000 * c["seconds"]
            assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 7)
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = c[key]
            assert 0 <= d["p50"] <= d["p90"] <= d["p99"]
        assert c["ttft_ms"]["p99"] <= c["e2e_ms"]["p99"]
        # the worker's engine ran at least one step per token of every request in flight
        ((worker, use),) = c["engine"].items()
        assert use["steps"] >= c["output_tokens"] / c["load"]["concurrency"], worker
        assert use["busy_fraction"] > 0
    # the shared-prefix prompts are longer than the random ones: the server counted the prefix
    by = {(c["dataset"], c["load"]["concurrency"]): c for c in cells}
    assert by["shared-prefix", 1]["prompt_tokens"] > by["random", 1]["prompt_tokens"]
    # a chat conversation's second turn carries the first reply: longer prompts than turn one
    chat = by["chat", 1]["per_request"]
    first = [r["prompt_tokens"] for r in chat if r["turn"] == 0]
    second = [r["prompt_tokens"] for r in chat if r["turn"] == 1]
    assert len(first) == len(second) == 4 and min(second) > max(first)
    assert png.stat().st_size > 0


def test_a_peer_that_crashes_at_startup_fails_the_run_but_is_reported(
    smollm2_path, tmp_path, capsys
):
    """A llama-server that answers --version and then dies at startup (as an AMX build did
    on an AMX machine): its column says why, the JSON is written, and the exit is non-zero."""
    fake = tmp_path / "llama-server"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "version: 0 (fake)" && exit 0\n'
                    "echo crashed >&2\nexit 3\n")  # fmt: skip
    fake.chmod(0o755)
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--compare", "--servers", "llama-server", "--quick",
            "--llama-server", str(fake), "--model", smollm2_path, "--json", str(out)]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.run(args) == 1
    err = capsys.readouterr().err
    assert "llama-server failed: llama-server exited with status 3 at startup" in err
    assert err.strip().splitlines()[-1] == "splitserve: error: llama-server failed (see above)"
    run = json.loads(out.read_text())["servers"]["llama-server"]
    assert run["skipped"].startswith("llama-server exited with status 3") and run["cells"] == []
