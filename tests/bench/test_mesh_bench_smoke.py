"""The mesh benchmark's pure parts (no model, no processes, no timing asserts), and one quick
run of the whole benchmark on the tiny model.

Covers the workload variants (scaled workload, shared-prefix prompts), the arithmetic (ratios,
TTFT statistics and reductions, KV transfer rates from metric deltas, best-of-N), the mesh
topologies the benchmark builds from `splitserve up`'s flags, and the report: tables, the final
line, the JSON and the plot, from a made-up result.
"""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import generate_latest

from splitserve.bench import mesh_bench as mb
from splitserve.bench import mesh_runner as mr
from splitserve.bench import mesh_ttft as mt
from splitserve.bench import report
from splitserve.bench.phases import Phases
from splitserve.bench.workload import (
    MIN_TOKEN_ID,
    BenchRequest,
    ThroughputResult,
    WorkloadSpec,
    count_same,
    make_workload,
)
from splitserve.cli import build_parser
from splitserve.workers.metrics import WorkerMetrics

VOCAB = 49152
FINAL_LINE = re.compile(r"mesh_throughput_ratio_vs_engine: \d+\.\d\d")


# ---- workloads -----------------------------------------------------------------------------
def test_scaled_workload_keeps_ids_order_and_prompt_prefixes():
    full = make_workload(WorkloadSpec(), VOCAB)
    scaled = mb.scaled_workload(full, 0.25, 0.5)
    assert [r.request_id for r in scaled] == [r.request_id for r in full]
    for f, s in zip(full, scaled, strict=True):
        assert s.prompt_token_ids == f.prompt_token_ids[: s.prompt_len]
        assert s.prompt_len == -(-f.prompt_len // 4)  # ceil
        assert s.output_len == -(-f.output_len // 2)
    assert mb.scaled_workload(full, 1.0, 1.0) == full


@pytest.mark.parametrize("scales", [(0.0, 1.0), (1.0, 0.0), (1.5, 1.0), (1.0, -0.1)])
def test_scaled_workload_rejects_bad_scales(scales):
    with pytest.raises(ValueError):
        mb.scaled_workload([], *scales)


def test_full_workload_is_the_engine_workload_scaled_and_deterministic():
    requests = mb.bench_workload(mb.FULL, VOCAB)
    assert requests == mb.bench_workload(mb.FULL, VOCAB)
    assert len(requests) == 32
    full = make_workload(WorkloadSpec(), VOCAB)
    assert requests == mb.scaled_workload(full, mb.FULL.prompt_scale, mb.FULL.output_scale)
    assert all(r.output_len >= 1 and r.prompt_len >= 1 for r in requests)
    assert len(mb.bench_workload(mb.QUICK, VOCAB)) == mb.QUICK.workload.num_requests


def test_shared_prefix_prompts():
    s = mb.FULL
    p = mt.shared_prefix_prompts(s, VOCAB, seed=0, nonce="abc")
    assert len(p.system) == s.system_prompt_tokens
    assert all(MIN_TOKEN_ID <= t < VOCAB for t in p.system)
    assert set(p.prompts) == set(mt.TTFT_CASES)
    suffixes = set()
    for case in mt.TTFT_CASES:
        assert len(p.prompts[case]) == s.ttft_requests
        for prompt in p.prompts[case]:
            assert prompt[: len(p.system)] == p.system
            assert len(prompt) == s.system_prompt_tokens + s.suffix_tokens
            suffixes.add(prompt[len(p.system) :])
    assert len(suffixes) == 3 * s.ttft_requests  # every request's suffix is its own
    assert len(set(p.salts)) == s.ttft_requests
    other = mt.shared_prefix_prompts(s, VOCAB, seed=0, nonce="xyz")
    assert other.prompts == p.prompts and not set(other.salts) & set(p.salts)


def test_chain_keys_share_the_prefix_under_one_salt_only():
    from splitserve.engine.hashing import kv_namespace

    s = mb.QUICK
    p = mt.shared_prefix_prompts(s, VOCAB, seed=0, nonce="n")
    keys = mt.ChainKeys.of(p, kv_namespace("m", "float32", 16), 16)
    n = s.system_prompt_tokens // 16
    assert [len(k) for k in keys.prefix] == [n] * s.ttft_requests
    for case in mt.TTFT_CASES:
        for i, chain in enumerate(keys.prompts[case]):
            assert chain[:n] == keys.prefix[i]  # same salt: the prefix blocks are shared
    assert keys.prefix[0][0] != keys.prefix[1][0]  # another salt: nothing is


# ---- arithmetic ----------------------------------------------------------------------------
def test_reduction():
    assert mt.reduction(0.3, 1.0) == pytest.approx(0.7)
    assert mt.reduction(1.0, 1.0) == 0.0
    assert mt.reduction(2.0, 1.0) == pytest.approx(-1.0)  # slower: a negative reduction
    assert mt.reduction(1.0, 0.0) == 0.0


def test_best_of_keeps_the_fastest_run_and_every_time():
    runs = [ThroughputResult(100, 4.0), ThroughputResult(100, 2.0), ThroughputResult(100, 3.0)]
    best = mb.ThroughputRun.best_of("x", runs)
    assert best.result.seconds == 2.0 and best.tokens_per_s == 50.0
    assert best.seconds == [4.0, 2.0, 3.0]


def test_count_same_tokens():
    engine = {"a": [1, 2], "b": [3], "c": [4]}
    assert count_same({"a": [1, 2], "b": [9], "c": [4]}, engine) == 2
    assert count_same({}, engine) == 0


def test_transfer_rate_from_the_decode_workers_metrics():
    m = WorkerMetrics("decode", "decode-0")
    before = mr.parse_metrics(generate_latest(m.registry).decode())
    m.transfer_bytes("received", 30_000_000)
    m.transfer_bytes("received", 20_000_000)
    m.kv_transfer_seconds.observe(0.25)
    m.kv_transfer_seconds.observe(0.25)
    after = mr.parse_metrics(generate_latest(m.registry).decode())
    t = mt.transfer_delta(before, after)
    assert (t.transfers, t.bytes, t.seconds) == (2, 50e6, 0.5)
    assert t.mb_per_s == pytest.approx(100.0)
    assert t.mean_seconds == 0.25 and t.mean_mb == 25.0
    assert mt.TransferStats().mb_per_s == 0.0 and mt.TransferStats().mean_seconds == 0.0


def test_sample_sums_over_labels_it_was_not_asked_about():
    samples = {
        ("x_total", (("direction", "sent"), ("role", "p"))): 2.0,
        ("x_total", (("direction", "received"), ("role", "d"))): 5.0,
        ("y", ()): 7.0,
    }
    assert mr.sample(samples, "x_total") == 7.0
    assert mr.sample(samples, "x_total", direction="received") == 5.0
    assert mr.sample(samples, "missing") == 0.0


# ---- topologies (built, never started) -------------------------------------------------------
def test_flag_helpers():
    args = ["--a", "1", "--kvstore", "h:1", "--p", "x", "--p", "y"]
    assert mr.strip_flag(args, "--kvstore") == ["--a", "1", "--p", "x", "--p", "y"]
    assert mr.strip_flag(args, "--p", "x") == ["--a", "1", "--kvstore", "h:1", "--p", "y"]
    assert mr.set_flag(args, "--a", "2")[:2] == ["--a", "2"]


def test_place_keeps_to_the_band_in_a_random_order(monkeypatch):
    """Two benchmarks started at once must not both try the same plan first."""
    monkeypatch.setenv(mr.PORT_OFFSETS_ENV, "2000-5000")
    assert mr.port_offsets() == range(2000, 5000)
    monkeypatch.setattr(mr, "_all_ports_free", lambda topology: False)  # every plan is taken
    orders: set[tuple[int, ...]] = set()
    for _ in range(6):
        tried: list[int] = []
        with pytest.raises(mr.MeshError, match="no free set of ports"):
            mr.place(tried.append)
        assert sorted(tried) == list(range(2000, 5000, mr.PORT_OFFSET_STEP))
        orders.add(tuple(tried))
    assert len(orders) > 1
    monkeypatch.delenv(mr.PORT_OFFSETS_ENV)
    assert mr.port_offsets() == mr.PORT_OFFSETS


def test_colocated_topology_has_no_kvstore_and_the_baseline_flags():
    flags = ["--dtype", "float32", "--max-num-batched-tokens", "256"]
    t = mr.colocated_topology(flags)
    assert [s.name for s in t.services] == ["colocated-0", "router"]
    worker = t.service("colocated-0")
    assert "--kvstore" not in worker.args and worker.depends_on == []
    assert worker.args[worker.args.index("--max-num-batched-tokens") + 1] == "256"
    assert "--colocated" in t.router.args


def test_disagg_topology_gives_each_router_its_own_prefill_worker():
    t = mr.disagg_topology([])
    names = {s.name for s in t.services}
    assert names == {"kvstore", "prefill-0", "prefill-1", "decode-0", "router", "router-cold"}

    def pools(router: str) -> list[str]:
        args = t.service(router).args
        return [args[i + 1] for i, a in enumerate(args) if a in ("--prefill", "--decode")]

    addr = {s.name: f"127.0.0.1:{s.ports['grpc']}" for s in t.services}
    assert pools("router") == [addr["prefill-1"], addr["decode-0"]]
    assert pools("router-cold") == [addr["prefill-0"], addr["decode-0"]]
    assert "prefill-0" not in t.service("router").depends_on
    cold = t.service("router-cold")
    assert cold.ports["grpc"] == int(cold.args[cold.args.index("--grpc-port") + 1])
    ports = [p for s in t.services for p in s.ports.values()]
    assert len(ports) == len(set(ports))
    # the routers' public ports are the plan's own, below the OS's ephemeral range: never
    # handed to an outgoing connection between the free-port check and the bind
    for router in ("router", "router-cold"):
        assert all(t.service(router).ports[p] < 32768 for p in ("grpc", "http"))
    for w in ("prefill-0", "prefill-1", "decode-0"):
        assert "--kvstore" in t.service(w).args and "metrics" in t.service(w).ports


# ---- report --------------------------------------------------------------------------------
def made_up_result() -> mb.MeshBenchResult:
    s = mb.QUICK
    workload = [BenchRequest(f"req-{i}", (100 + i,) * 10, 5) for i in range(4)]
    bench = mb.MeshBenchResult(
        "tiny",
        s,
        {"dtype": "float32", "block_size": 16, "kv_blocks": 8, "kv_pool_bytes": 1 << 20},
        workload,
    )
    bench.engine = mb.ThroughputRun("engine", ThroughputResult(20, 2.0), [2.0])
    bench.colocated = mb.ThroughputRun("colocated", ThroughputResult(20, 2.5), [2.5], 4)
    bench.disagg = mb.ThroughputRun("disagg", ThroughputResult(20, 4.0), [4.0], 3)
    transfer = mt.TransferStats(2, 50e6, 0.5)
    for case, ttft in (("cold", 2.0), ("warm_store", 0.5), ("warm_local", 0.4)):
        bench.ttft[case] = mt.TTFTCase(
            case, [ttft, ttft], [264, 264], [0 if case == "cold" else 256] * 2, [0, 0],
            0 if case != "warm_store" else 32, transfer,
        )  # fmt: skip
    bench.workload_transfer = mt.TransferStats(4, 8e6, 0.2)
    return bench


def test_ratios_and_final_line():
    bench = made_up_result()
    assert bench.colocated_ratio == pytest.approx(0.8)
    assert bench.disagg_ratio == pytest.approx(0.5)
    assert bench.ttft_reduction("warm_store") == pytest.approx(0.75)
    assert bench.ttft_reduction("warm_local", "median") == pytest.approx(0.8)
    assert bench.ttft["warm_store"].transfer_share == pytest.approx(0.5)
    assert mb.final_line(bench) == "mesh_throughput_ratio_vs_engine: 0.80"
    assert FINAL_LINE.fullmatch(mb.final_line(bench))


def test_report_tables():
    lines = mb.report_lines(made_up_result())
    text = "\n".join(lines)
    for heading in ("(a) setup", "(b) TTFT", "(c) KV transfer prefill->decode"):
        assert heading in text
    row = next(ln for ln in lines if ln.startswith("mesh, colocated"))
    assert row.split()[-3:] == ["0.80", "4/4", "-"]  # no CPU accounting in a made-up result
    cold = next(ln for ln in lines if ln.startswith("cold"))
    assert "2,000" in cold
    warm = next(ln for ln in lines if ln.startswith("warm store") and "%" in ln)
    assert "75.0%" in warm
    assert "ttft_warm_store_reduction: 75.0% (mean), 75.0% (median)" in lines
    assert "kv_transfer_mb_per_s: 100" in lines
    assert lines[-1] == "mesh_disaggregated_ratio_vs_engine: 0.50"


def test_json_and_plot(tmp_path):
    bench = made_up_result()
    phases = Phases(1, "bench mesh", enabled=False)
    with phases("one"):
        pass
    path = tmp_path / "out.json"
    report.write_json(str(path), mb.json_doc(bench, phases))
    doc = json.loads(path.read_text())
    assert doc["mesh_throughput_ratio_vs_engine"] == pytest.approx(0.8)
    assert doc["throughput"]["colocated"]["same_tokens_as_engine"] == 4
    assert doc["ttft"]["warm_store"]["reduction_vs_cold_mean"] == pytest.approx(0.75)
    assert doc["ttft"]["cold"]["transfer"]["mb_per_s"] == pytest.approx(100.0)
    assert doc["kv_transfer_mb_per_s"] == pytest.approx(100.0)
    assert set(doc["phase_seconds"]) == {"one"}
    png = tmp_path / "out.png"
    mb.write_plot(str(png), bench)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- CLI -----------------------------------------------------------------------------------
def test_cli_registers_bench_mesh_and_its_settings():
    args = build_parser().parse_args(["bench", "mesh", "--quick", "--seed", "3"])
    assert args.run is mb.run
    s = mb._settings(args)
    assert s.workload.seed == 3 and s.ttft_requests == mb.QUICK.ttft_requests
    args = build_parser().parse_args(
        ["bench", "mesh", "--workload-scale", "1", "--repeats", "3", "--threads", "2"]
    )
    s = mb._settings(args)
    assert (s.prompt_scale, s.output_scale, s.repeats) == (1.0, 1.0, 3)
    from splitserve.launcher.topology import engine_argv

    argv = engine_argv(args)  # what the workers get
    assert argv[argv.index("--threads") + 1] == "2"
    for bad in (["--workload-scale", "0"], ["--repeats", "0"]):
        with pytest.raises(ValueError):
            mb._settings(build_parser().parse_args(["bench", "mesh", *bad]))


# ---- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_end_to_end(tiny_model_dir, tmp_path, capsys):
    """Both meshes for real (API key, mutual TLS, the kvstore): every TTFT request's KV lands in
    the kvstore under the keys the benchmark computes (the tenant prefixes the salt), and a
    warm request finds its prefix there."""
    out = tmp_path / "mesh.json"
    argv = ["bench", "mesh", "--quick", "--model", tiny_model_dir, "--json", str(out)]
    args = build_parser().parse_args(argv)
    assert args.run(args) == 0
    assert FINAL_LINE.search(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    ttft = doc["ttft"]
    assert set(ttft) == {"cold", "warm_store", "warm_local"}
    assert all(n == 0 for n in ttft["cold"]["cached_prompt_tokens"])
    assert all(n > 0 for n in ttft["warm_store"]["cached_prompt_tokens"])
    assert ttft["warm_store"]["store_blocks_fetched"] > 0
    assert all(n > 0 for n in ttft["warm_store"]["store_prefix_blocks_before"])
