"""Pipeline parallelism with real stage processes: the same tokens as one process, KV moves
across stages, and a dead stage fails fast and leaves nothing behind.

Every layout runs one scenario against the single-process engine on the same weights: a batch
whose prompts are prefilled in chunks while others decode, in a pool small enough to force
preemption; greedy tokens must be identical and logprobs within 1e-4. Tiny random configs
cover PP=2, PP=2 with 4 micro-batches and PP=4; the real SmolLM2 covers PP=2 with 4
micro-batches. The stages are child processes of this test (one torch thread each).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from models import LAYOUT_ENGINE, LAYOUT_TINY

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine, create_random_engine
from splitserve.executors.pipeline.executor import (
    PipelineError,
    PipelineExecutor,
    StageUnavailableError,
)
from splitserve.executors.pipeline.stage import MAX_RESULTS_STREAMS
from splitserve.v1 import pb, rpc
from splitserve.wire.pipeline_codec import tensor_message, wire_bytes
from splitserve.wire.step_wire import StepWire

TINY = LAYOUT_TINY
TINY_BASE = LAYOUT_ENGINE
TINY_LAYOUTS = {
    "pp2": dict(pipeline_stages=2),
    "pp2-m4": dict(pipeline_stages=2, micro_batches=4),
    "pp2-m4-step": dict(pipeline_stages=2, micro_batches=4, pipeline_schedule="step"),
    "pp4-m3": dict(pipeline_stages=4, micro_batches=3),
}
PARAMS = SamplingParams(max_tokens=16, temperature=0, logprobs=0, ignore_eos=True)
DEADLINE_S = 15.0  # a dead stage must fail the step within this


@pytest.fixture(autouse=True, scope="module")
def _threads_restored() -> Iterator[None]:
    threads = torch.get_num_threads()  # create_engine with num_threads sets it process-wide
    yield
    torch.set_num_threads(threads)


def tiny_prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in (3, 30, 7, 45, 12, 2)]


def tiny_engine(**overrides) -> LLMEngine:
    return create_random_engine(TINY, EngineConfig(**{**TINY_BASE, **overrides}))


def assert_same(ref: list[RequestOutput], got: list[RequestOutput]) -> None:
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert b.new_token_ids == a.new_token_ids, f"prompt {i}"
        diff = max(abs(x - y) for x, y in zip(a.new_logprobs, b.new_logprobs, strict=True))
        assert diff < 1e-4, f"prompt {i}: logprobs differ by {diff}"


def assert_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _alive(pid):
            assert time.monotonic() < deadline, f"stage process {pid} is still running"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie: gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def executor(engine: LLMEngine) -> PipelineExecutor:
    ex = engine.runner.executor
    assert isinstance(ex, PipelineExecutor)
    return ex


@pytest.fixture(scope="module")
def tiny_reference() -> tuple[list[RequestOutput], LLMEngine]:
    engine = tiny_engine()
    out = engine.generate(tiny_prompts(), PARAMS)
    assert engine.stats.num_preemptions > 0, "the scenario must preempt"
    return out, engine


@pytest.fixture(params=sorted(TINY_LAYOUTS))
def tiny_pipeline(request: pytest.FixtureRequest) -> Iterator[LLMEngine]:
    engine = tiny_engine(**TINY_LAYOUTS[request.param])
    pids = executor(engine).stage_pids
    assert len(pids) == engine.config.pipeline_stages - 1
    try:
        yield engine
    finally:
        engine.close()
        assert_gone(pids)


def test_tiny_layouts_give_the_single_process_tokens(tiny_pipeline, tiny_reference):
    ref, ref_engine = tiny_reference
    got = tiny_pipeline.generate(tiny_prompts(), PARAMS)
    assert_same(ref, got)
    ex, cfg = executor(tiny_pipeline), tiny_pipeline.config
    stats = ex.stage_stats()
    assert [(s.first_layer, s.last_layer) for s in stats] == ex.ranges
    # Every stage ran every micro-batch, and the micro-batches really were cut.
    assert len({s.micro_batches for s in stats}) == 1
    assert len({s.tokens for s in stats}) == 1
    assert all(s.busy_s > 0 for s in stats)
    if cfg.pipeline_schedule == "step":
        assert tiny_pipeline.stats.num_preemptions == ref_engine.stats.num_preemptions
        assert stats[0].micro_batches > tiny_pipeline.stats.num_steps
        assert ex.peak_pending == cfg.micro_batches  # a step's micro-batches, all in flight
        return
    # overlap: a step is one group's micro-batch, and up to M groups were in flight at once
    assert tiny_pipeline.stats.num_preemptions > 0, "the scenario must preempt"
    assert stats[0].micro_batches == tiny_pipeline.stats.num_steps
    assert ex.peak_pending == cfg.micro_batches
    assert tiny_pipeline.block_manager.num_free_blocks == cfg.num_kv_blocks


def test_kv_gathers_and_scatters_across_stages(tiny_reference):
    _, ref_engine = tiny_reference
    engine = tiny_engine(
        pipeline_stages=2, pipeline_layers=(3, 1), micro_batches=2, pipeline_schedule="step"
    )
    try:
        engine.generate(tiny_prompts(), PARAMS)  # the same schedule fills the same blocks
        ex = executor(engine)
        blocks = [0, 5, 9, 23]
        kv = ex.read_kv(blocks)
        assert kv.shape == (4, 2, 4, 4, 2, 16)
        ref_kv = ref_engine.runner.executor.read_kv(blocks)
        torch.testing.assert_close(kv, ref_kv, rtol=0, atol=1e-4)  # micro-batches: other sums
        ex.write_kv([1, 2, 3, 4], kv)
        assert torch.equal(ex.read_kv([1, 2, 3, 4]), kv)
        # The runner's own checks and the export path see the full layout too.
        export = engine.runner.read_blocks([7, 8], num_tokens=6)
        assert export.data.shape[0] == TINY.num_layers
    finally:
        engine.close()


@pytest.mark.parametrize("victim", [1, 2])
def test_a_killed_stage_fails_the_step_quickly(victim):
    engine = tiny_engine(pipeline_stages=3, micro_batches=2)
    pids = executor(engine).stage_pids
    try:
        engine.generate([[5, 6, 7]], PARAMS)
        os.kill(pids[victim - 1], signal.SIGKILL)
        engine.add_request("after", [1, 2, 3, 4, 5], PARAMS)
        start = time.monotonic()
        with pytest.raises(StageUnavailableError, match=f"stage {victim}"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < DEADLINE_S
        assert engine.abort_request("after")  # what a worker does with the failed requests
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.config.num_kv_blocks
        # From now on every step fails at once: this pipeline can't come back.
        start = time.monotonic()
        with pytest.raises(StageUnavailableError):
            executor(engine).execute(engine.runner.prepare([], []).wire)
        assert time.monotonic() - start < 1.0
    finally:
        engine.close()
    assert_gone(pids)


def test_overlap_aborting_a_request_in_flight_frees_its_blocks_once_its_step_is_back():
    engine = tiny_engine(pipeline_stages=2, micro_batches=2)
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        for i in range(4):
            engine.add_request(f"r{i}", [3 + i, 4, 5, 6, 7], params)
        first = {o.request_id for o in engine.step()}  # two groups went in, one came back
        assert len(first) == 2
        late = sorted({"r0", "r1", "r2", "r3"} - first)
        bm = engine.block_manager
        free = bm.num_free_blocks
        assert engine.abort_request(late[0])
        assert not engine.abort_request(late[0])
        assert bm.num_free_blocks == free  # the stage may still be writing its KV
        second = {o.request_id for o in engine.step()}
        assert second == {late[1]}  # nothing more for the aborted one
        assert bm.num_free_blocks > free
        for rid in ("r0", "r1", late[1]):
            engine.abort_request(rid)
        while engine.has_unfinished_requests():  # the steps still in flight come back
            assert all(o.request_id not in {"r0", "r1"} for o in engine.step())
        assert bm.num_free_blocks == engine.config.num_kv_blocks
        # The engine serves again afterwards.
        (out,) = engine.generate([[9, 8, 7]], params)
        assert len(out.new_token_ids) == 8
    finally:
        engine.close()


def test_overlap_a_request_aborted_in_flight_leaks_nothing_when_a_stage_dies():
    engine = tiny_engine(pipeline_stages=2, micro_batches=2)
    ex = executor(engine)
    (pid,) = ex.stage_pids
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        for i in range(4):
            engine.add_request(f"r{i}", [3 + i, 4, 5, 6, 7], params)
        first = {o.request_id for o in engine.step()}  # group A back, group B in flight
        deadline = time.monotonic() + DEADLINE_S
        while ex._link._inbox.empty():  # B's logits are here: nothing left on the stage
            assert time.monotonic() < deadline, "group B never came back"
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        # A goes into the dead pipeline; B, already back, is collected.
        assert {o.request_id for o in engine.step()} == {"r0", "r1", "r2", "r3"} - first
        assert engine.abort_request(sorted(first)[0])  # its step can never come back now
        with pytest.raises(StageUnavailableError):
            engine.step()
        for rid in ("r0", "r1", "r2", "r3"):  # the worker fails what was running
            engine.abort_request(rid)
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.config.num_kv_blocks
    finally:
        engine.close()
    assert_gone([pid])


def test_a_silent_stage_fails_the_step_after_the_timeout():
    engine = tiny_engine(pipeline_stages=2, pipeline_timeout_s=1.0)
    (pid,) = executor(engine).stage_pids
    try:
        os.kill(pid, signal.SIGSTOP)
        engine.add_request("r", [1, 2, 3], PARAMS)
        start = time.monotonic()
        with pytest.raises(StageUnavailableError, match="stage 1"):
            engine.step()
        assert time.monotonic() - start < DEADLINE_S
    finally:
        os.kill(pid, signal.SIGCONT)
        engine.close()
    assert_gone([pid])


def test_stages_exit_when_their_worker_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        from splitserve.engine.config import EngineConfig, ModelConfig
        from splitserve.executors.build import create_random_engine
        cfg = ModelConfig(**{TINY.__dict__!r})
        engine = create_random_engine(cfg, EngineConfig(**{TINY_BASE!r}, pipeline_stages=3))
        print(*engine.runner.executor.stage_pids, flush=True)
        input()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        assert all(_alive(p) for p in pids)
        proc.kill()
        proc.wait()
        assert_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- stages started elsewhere ---------------------------------------------------------------
@pytest.fixture(scope="module")
def external_stage(tiny_model_dir: str, tmp_path_factory) -> Iterator[str]:
    """Stage 1 of 2 of the tiny checkpoint, started by hand as compose would."""
    port_file = tmp_path_factory.mktemp("stage") / "port"
    flags = (
        f"--stage-index 1 --pipeline-stages 2 --model {tiny_model_dir} --num-kv-blocks 64 "
        f"--threads 1 --port 0 --port-file {port_file}"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.executors.pipeline.stage", *flags.split()]
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, "the stage exited"
            assert time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.1)
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_external_stages_are_checked_and_used(tiny_model_dir, external_stage):
    base = dict(model=tiny_model_dir, num_kv_blocks=64, num_threads=1)
    prompts = [[1, 50, 400, 7000], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    ref = create_engine(EngineConfig(**base)).generate(prompts, PARAMS)
    engine = create_engine(
        EngineConfig(**base, pipeline_stages=2, pipeline_stage_addresses=(external_stage,))
    )
    try:
        assert executor(engine).stage_pids == []
        assert_same(ref, engine.generate(prompts, PARAMS))
    finally:
        engine.close()
    # A worker whose layers or pool differ from the stage's is refused, each difference named.
    bad = EngineConfig(
        **{**base, "num_kv_blocks": 32},
        pipeline_stages=2,
        pipeline_layers=(1, 3),
        pipeline_stage_addresses=(external_stage,),
    )
    with pytest.raises(PipelineError, match=r"first_layer.*num_blocks"):
        create_engine(bad)


def _micro_batch(hidden_size: int, results_stream: str = "", **change) -> pb.StageForwardRequest:
    """One decode token of one sequence in KV block 0, as stage 0 would send it."""
    wire = StepWire([1], [0], [0], [1], [[change.get("block", 0)]], [0])
    hidden = torch.zeros(change.get("rows", 1), hidden_size)
    return pb.StageForwardRequest(
        step_wire=wire_bytes(wire), hidden=tensor_message(hidden), results_stream=results_stream
    )


def _tiny_dims(tiny_model_dir: str) -> tuple[int, int]:
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg["hidden_size"], cfg["vocab_size"]


def _open_results(stub: rpc.StageStub, stream_id: str):
    """An open Results stream, once the stage has let go of streams cancelled just before."""
    deadline = time.monotonic() + 10
    while True:
        stream = stub.Results(pb.StageResultsRequest(stream_id=stream_id), timeout=60)
        try:
            next(stream)
            return stream
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert time.monotonic() < deadline, "cancelled Results streams stay open"
            time.sleep(0.1)


def test_the_last_stage_answers_on_a_results_stream(tiny_model_dir, external_stage):
    hidden, vocab = _tiny_dims(tiny_model_dir)
    with grpc.insecure_channel(external_stage) as channel:
        stub = rpc.StageStub(channel)
        results = stub.Results(pb.StageResultsRequest(stream_id="r1"), timeout=60)
        assert not next(results).HasField("logits")  # open: micro-batches may name it
        forward = stub.Forward(iter([_micro_batch(hidden, "r1")]), timeout=60)
        assert list(forward) == []  # nothing comes back along the chain...
        (answer,) = list(results)  # ...the answer came here, and this stream ended with it
        assert tuple(answer.logits.shape) == (1, vocab) and answer.logits.dtype == "float32"


def test_bad_stage_requests_get_clear_statuses(tiny_model_dir, external_stage):
    hidden, _ = _tiny_dims(tiny_model_dir)
    bad = {
        "a Results stream without an id": lambda stub: stub.Results(pb.StageResultsRequest()),
        "a micro-batch naming no open stream": lambda stub: stub.Forward(
            iter([_micro_batch(hidden, "never-opened")])
        ),
        "a block outside the pool": lambda stub: stub.Forward(
            iter([_micro_batch(hidden, block=10_000)])
        ),
        "hidden states of the wrong shape": lambda stub: stub.Forward(
            iter([_micro_batch(hidden, rows=3)])
        ),
    }
    codes = {}
    with grpc.insecure_channel(external_stage) as channel:
        stub = rpc.StageStub(channel)
        for what, call in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                list(call(stub))
            codes[what] = err.value.code()
        # An id already open is refused; the open stream is not disturbed.
        first = stub.Results(pb.StageResultsRequest(stream_id="twice"), timeout=60)
        next(first)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Results(pb.StageResultsRequest(stream_id="twice"), timeout=10))
        codes["an id already open"] = err.value.code()
        first.cancel()
        # Only so many Results streams may be open at once.
        streams = [_open_results(stub, f"many-{i}") for i in range(MAX_RESULTS_STREAMS)]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Results(pb.StageResultsRequest(stream_id="one-too-many"), timeout=10))
        codes["one stream too many"] = err.value.code()
        for stream in streams:
            stream.cancel()
        # ...and the stage still serves.
        assert len(list(stub.Forward(iter([_micro_batch(hidden)]), timeout=60))) == 1
        _open_results(stub, "again").cancel()  # the cancelled streams were let go of
    invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    assert codes == {
        "a Results stream without an id": invalid,
        "a micro-batch naming no open stream": precondition,
        "a block outside the pool": invalid,
        "hidden states of the wrong shape": invalid,
        "an id already open": invalid,
        "one stream too many": grpc.StatusCode.RESOURCE_EXHAUSTED,
    }


# ---- the real model -------------------------------------------------------------------------
SMOL_PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley except his own, which had stopped years before",
    "Paris is the capital of",
]
SMOL_BASE = dict(num_kv_blocks=16, block_size=4, max_num_batched_tokens=24, num_threads=1)


@pytest.fixture(scope="module")
def smol_prompts(smollm2_checkpoint) -> list[list[int]]:
    return [smollm2_checkpoint.tokenizer.encode(p) for p in SMOL_PROMPTS]


@pytest.mark.slow
def test_smollm2_pp2_with_micro_batches(smollm2_checkpoint, smol_prompts):
    ref_engine = create_engine(EngineConfig(**SMOL_BASE), smollm2_checkpoint)
    ref = ref_engine.generate(smol_prompts, PARAMS)
    assert ref_engine.stats.num_preemptions > 0
    engine = create_engine(
        EngineConfig(**SMOL_BASE, pipeline_stages=2, micro_batches=4), smollm2_checkpoint
    )
    try:
        assert executor(engine).ranges == [(0, 15), (15, 30)]
        assert_same(ref, engine.generate(smol_prompts, PARAMS))
        # the overlap schedule: a step is one group's micro-batch, four groups in flight
        assert executor(engine).stage_stats()[0].micro_batches == engine.stats.num_steps
        assert executor(engine).peak_pending == 4
        assert_same_prompt_kv(ref_engine, engine, smol_prompts)
    finally:
        engine.close()


@pytest.mark.slow
def test_smollm2_pp2_under_blocks_int8_gives_the_single_process_tokens(
    smollm2_checkpoint, smol_prompts
):
    # int8 activations are rounded row by row, and every step here is small enough for the
    # fused loop (model/fused_decode.py) on both sides, so a stage that runs its layers on the
    # hidden state it was sent computes what one process computes: same tokens and logprobs.
    base = dict(SMOL_BASE, linear_backend="blocks-int8")
    ref = create_engine(EngineConfig(**base), smollm2_checkpoint).generate(smol_prompts, PARAMS)
    engine = create_engine(EngineConfig(**base, pipeline_stages=2), smollm2_checkpoint)
    try:
        assert_same(ref, engine.generate(smol_prompts, PARAMS))
    finally:
        engine.close()


def exported_prompt_kv(engine: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's KV as the engine exports it when the request finishes."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"kv-{i}", prompt, params, export_kv=True)
    kv: dict[str, torch.Tensor] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:  # the prompt's slots; the last block's others hold anything
                d = out.kv.data
                tokens = d.reshape(*d.shape[:2], -1, *d.shape[4:])
                kv[out.request_id] = tokens[:, :, : out.kv.num_tokens]
    return [kv[f"kv-{i}"] for i in range(len(prompts))]


def assert_same_prompt_kv(ref: LLMEngine, got: LLMEngine, prompts: list[list[int]]) -> None:
    """Wherever each engine put the blocks, a request's KV is the same (micro-batches: other
    sums, so to 1e-4)."""
    pairs = zip(exported_prompt_kv(ref, prompts), exported_prompt_kv(got, prompts), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


# ---- with tensor parallelism inside each stage -----------------------------------------------
def test_tp2_by_pp2_gives_the_single_process_tokens(tiny_reference):
    pytest.importorskip("splitserve.executors.tensor_parallel")
    ref, _ = tiny_reference
    engine = tiny_engine(pipeline_stages=2, micro_batches=2, tensor_parallel_size=2)
    try:
        assert_same(ref, engine.generate(tiny_prompts(), PARAMS))
        assert_same_prompt_kv(tiny_reference[1], engine, tiny_prompts())
    finally:
        engine.close()
