"""Pipeline stages as services of their own, on the real SmolLM2.

`splitserve up --colocated --pipeline-stages 2 --stage-services` starts the stage for layers
15-29 as a service (the launcher's child, not the worker's: under compose it gets its own
container) and points the worker at it with --pipeline-stage-addresses. Greedy tokens through
the router must be the in-process engine's.
"""

from __future__ import annotations

import pytest
from mesh_fixtures import greedy, prompt_ids, start_mesh, stream_ids
from procs import child_pids

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import pb, rpc

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
PROMPTS = ["The three primary colours are", "def fibonacci(n):"]


def test_stage_services_give_the_engine_tokens(
    tmp_path, reference_engine: LLMEngine, tokenizer: Tokenizer
):
    flags = ("--colocated", "--pipeline-stages", "2", "--stage-services")
    mesh = start_mesh(tmp_path, *flags)
    try:
        assert mesh.topology.names[:3] == ["kvstore", "colocated-0-stage-1", "colocated-0"]
        worker = mesh.mesh.children["colocated-0"].proc.pid
        assert child_pids(worker) == []  # the stage is the launcher's, not the worker's
        expected = greedy(reference_engine, [prompt_ids(tokenizer, p) for p in PROMPTS], MAX_TOKENS)
        for i, prompt in enumerate(PROMPTS):
            req = pb.GenerateRequest(
                prompt=prompt, sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)
            )
            ids, _, _, _ = stream_ids(mesh.inference().Generate(req, timeout=300))
            assert ids == expected[i], f"prompt {i} ({prompt!r})"
        stats = rpc.StageStub(mesh.channel("colocated-0-stage-1")).Stats(
            pb.StageStatsRequest(), timeout=30
        )
        assert (stats.first_layer, stats.last_layer) == (15, 30)
        assert stats.micro_batches > 0 and stats.busy_seconds > 0  # it did the work
    finally:
        mesh.stop()
