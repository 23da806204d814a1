"""The engine benchmark's harness on tiny random-weight models: no GGUF load, no timing asserts.

Covers the workload generator, the roofline arithmetic, the KV pool sizing, both runners (ours
and the HF static-batching baseline), the report's final line, and one end-to-end `run()` with
the model swapped for a tiny one saved as a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from models import tiny_hf
from transformers import AutoConfig, AutoModelForCausalLM

from splitserve.bench import engine_bench as eb
from splitserve.bench import hf_baseline as hf
from splitserve.bench import roofline as rl
from splitserve.bench.report import write_json
from splitserve.bench.workload import (
    MIN_TOKEN_ID,
    DecodeResult,
    ThroughputResult,
    WorkloadSpec,
    batches,
    make_workload,
    ratio,
)
from splitserve.cli import build_parser
from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.executors.build import create_random_engine

HF_TINY = tiny_hf(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=512,
    bos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=True,
)
TINY = ModelConfig.from_hf(HF_TINY, name="tiny")
SMALL_SPEC = WorkloadSpec(6, (8, 40), (2, 12), seed=3)
FINAL_LINE = re.compile(r"throughput_ratio_vs_hf: \d+\.\d\d")


@pytest.fixture(scope="module")
def hf_tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**HF_TINY)).eval()


# ---- workload ------------------------------------------------------------------------------
def test_workload_is_deterministic_and_in_range():
    spec = WorkloadSpec()
    requests = make_workload(spec, 49152)
    assert requests == make_workload(spec, 49152)
    assert requests != make_workload(WorkloadSpec(seed=1), 49152)
    assert len(requests) == 32
    assert len({r.request_id for r in requests}) == 32
    for r in requests:
        assert 32 <= r.prompt_len <= 512 and 16 <= r.output_len <= 256
        assert all(MIN_TOKEN_ID <= t < 49152 for t in r.prompt_token_ids)


@pytest.mark.parametrize(
    "kwargs", [dict(num_requests=0), dict(prompt_len=(5, 4)), dict(output_len=(0, 3))]
)
def test_workload_spec_rejects_bad_ranges(kwargs):
    with pytest.raises(ValueError):
        WorkloadSpec(**kwargs)


def test_batches_keep_arrival_order():
    requests = make_workload(WorkloadSpec(num_requests=10), 1000)
    groups = batches(requests, 8)
    assert [len(g) for g in groups] == [8, 2]
    assert [r for g in groups for r in g] == requests


def test_kv_pool_is_a_fraction_of_the_workload_but_fits_the_longest_request():
    requests = make_workload(WorkloadSpec(), 49152)
    total = sum(r.total_len for r in requests)
    blocks = eb.kv_pool_blocks(requests, 16, 0.6)
    assert 0.6 * total <= blocks * 16 < 0.6 * total + 16
    assert eb.kv_pool_blocks(requests, 16, 0.001, min_tokens=1000) * 16 > 1000


# ---- arithmetic ----------------------------------------------------------------------------
def test_matmul_params_match_the_model():
    engine = create_random_engine(TINY, EngineConfig(num_kv_blocks=8, linear_backend="torch"))
    layers = engine.runner.executor.shard.model.layers
    layer_weights = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    assert rl.body_matmul_params(TINY) == layer_weights
    assert rl.head_params(TINY) == 512 * 64
    assert rl.decode_weight_bytes(TINY, torch.bfloat16) == 2 * (layer_weights + 512 * 64)
    assert rl.kv_bytes_per_token(TINY, torch.float32) == 2 * 2 * 2 * 16 * 4


def test_flop_counts():
    per_pair = 4 * TINY.num_layers * TINY.num_heads * TINY.head_dim
    assert rl.attention_flops(TINY, 3) == per_pair * (1 + 2 + 3)
    body, head = rl.body_matmul_params(TINY), rl.head_params(TINY)
    expected = 2 * body * 14 + 2 * head * 5 + rl.attention_flops(TINY, 14)
    assert rl.request_flops(TINY, 10, 5) == expected


def test_roofline_fractions():
    traffic = rl.DecodeTraffic()
    traffic.add_step(0.5, 300, 100)
    traffic.add_step(0.5, 300, 300)
    assert traffic.steps == 2 and traffic.bytes_per_s == 1000
    line = rl.Roofline(model_flops=100, seconds=2.0, decode=traffic)
    assert line.achieved_flops == 50 and line.flops_fraction(200.0) == 0.25
    assert line.bandwidth_fraction(4000.0) == 0.25
    assert line.flops_fraction(0.0) == 0.0 and ratio(3.0, 0.0) == 0.0


def test_peaks_keep_the_best_measurement():
    first = rl.Peaks({"float32": 5.0, "bfloat16": 9.0}, 7.0, 64, 1024)
    second = rl.Peaks({"float32": 6.0, "bfloat16": 8.0}, 3.0, 64, 1024)
    assert first.best(second).matmul_flops == {"float32": 6.0, "bfloat16": 9.0}
    assert first.best(second).copy_bandwidth == 7.0


def test_peak_measurements_run_small():
    assert rl.measure_matmul_flops(torch.float32, n=64, repeats=1) > 0
    assert rl.measure_matmul_flops(torch.bfloat16, n=64, repeats=1) > 0
    assert rl.measure_copy_bandwidth(1 << 20, repeats=1) > 0
    peaks = rl.measure_peaks({"float32": torch.float32}, 32, 1 << 20)
    assert set(peaks.matmul_flops) == {"float32"}


# ---- runners -------------------------------------------------------------------------------
def test_engine_runs_the_workload_in_a_full_pool():
    requests = make_workload(SMALL_SPEC, TINY.vocab_size)
    blocks = eb.kv_pool_blocks(requests, 4, 0.6)
    engine = create_random_engine(TINY, EngineConfig(num_kv_blocks=blocks, block_size=4))
    eb.warm_up_engine(engine, TINY.vocab_size)
    assert engine.stats.num_steps == 0 and engine.block_manager.num_cached_blocks == 0
    result, traffic = eb.run_engine_workload(engine, requests, 1000, 10)
    assert result.generated_tokens == sum(r.output_len for r in requests)
    assert engine.stats.peak_slot_usage > 0.9
    assert 0 < traffic.steps < engine.stats.num_steps
    assert traffic.weight_bytes == 1000 * traffic.steps and traffic.kv_bytes > 0
    decode, single = eb.run_engine_decode(engine, tuple(range(100, 120)), 7, 1000, 10)
    assert decode.decode_tokens == 7 and single.steps == 7
    report = eb.kv_report(engine, requests)
    assert report.num_blocks == blocks and report.pool_bytes == engine.runner.kv_cache_bytes


def test_left_padding():
    ids, mask = hf.left_padded([(5, 6, 7), (8,)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_hf_static_batches_count_only_useful_tokens(hf_tiny):
    requests = make_workload(SMALL_SPEC, TINY.vocab_size)
    result = hf.run_static_batches(hf_tiny, requests, batch_size=4)
    assert result.generated_tokens == sum(r.output_len for r in requests)
    decode = hf.run_single_decode(hf_tiny, tuple(range(100, 120)), 6)
    assert decode.decode_tokens == 6 and decode.prompt_len == 20


# ---- report and CLI ------------------------------------------------------------------------
def _fake_result(dtype: str, ours: float, hf_tps: float) -> eb.DtypeResult:
    kv = eb.KVReport(10, 16, 1 << 20, 4 << 20, 200, 0.95, 1.0, 2, 30, 0.1)
    line = rl.Roofline(10**9, 1.0, rl.DecodeTraffic(3, 0.3, 300, 30))
    return eb.DtypeResult(
        dtype,
        ThroughputResult(int(hf_tps), 1.0),
        DecodeResult(8, 10, 1.0),
        ThroughputResult(int(ours), 1.0),
        DecodeResult(8, 20, 1.0),
        kv,
        line,
        rl.DecodeTraffic(2, 0.2, 200, 20),
    )


def test_report_ends_with_the_lower_ratio(tmp_path):
    results = [_fake_result("float32", 300, 100), _fake_result("bfloat16", 150, 100)]
    assert eb.final_line(results) == "throughput_ratio_vs_hf: 1.50"
    bench = SimpleNamespace(
        settings=eb.QUICK,
        checkpoint=SimpleNamespace(config=TINY),
        results=results,
        peaks=rl.Peaks({"float32": 1e11, "bfloat16": 2e11}, 1e10, 64, 1 << 20),
        phases=SimpleNamespace(seconds={"peaks": 1.0}),
    )
    lines = eb.report_lines(bench)
    assert "kv_utilization_peak: 0.95" in lines and "preemptions: 4" in lines
    write_json(str(tmp_path / "r.json"), eb.json_doc(bench))
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["throughput_ratio_vs_hf"] == 1.5 and doc["results"][0]["throughput_ratio"] == 3.0
    eb.write_plot(str(tmp_path / "r.png"), results)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_registers_bench_engine():
    args = build_parser().parse_args(["bench", "engine", "--quick", "--dtypes", "bf16"])
    assert args.run is eb.run and args.quick
    assert eb.parse_dtypes("bf16, float32,bfloat16") == ["bfloat16", "float32"]
    with pytest.raises(ValueError):
        eb.parse_dtypes("int8")


def test_quick_run_end_to_end(hf_tiny, tmp_path, monkeypatch, capsys):
    """`run --quick` on a tiny model saved as an HF folder, loaded by both sides from there."""
    from splitserve.model import loader

    folder = tmp_path / "tiny"
    hf_tiny.save_pretrained(folder)
    monkeypatch.setattr(loader, "default_model_path", lambda: str(folder))
    monkeypatch.setattr(hf, "load_hf_model", lambda path, dtype: copy.deepcopy(hf_tiny).to(dtype))
    args = argparse.Namespace(
        quick=True, dtypes="float32,bfloat16", json=None, plot=None, threads=None, seed=0
    )
    assert eb.run(args) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert FINAL_LINE.fullmatch(last), last
