"""What every end-to-end module shares: one disaggregated mesh and the reference engine.

The mesh is the biggest one the suite needs, started once per session (the machine has two
cores; every worker loads the model): kvstore on the real Redis backend, two prefill workers
(prefix sharing needs a second one), one decode worker and the router, every service printing
its spans (`SPLITSERVE_OTEL_EXPORTER=console`) into its log file. Each module leaves it idle,
and checks that it did (mesh_fixtures.assert_idle).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mesh_fixtures import RunningMesh, start_mesh

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.executors.build import create_engine
from splitserve.model.loader import Checkpoint

MIB = 1024 * 1024


@pytest.fixture(scope="session")
def disagg_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    mesh = start_mesh(
        tmp_path_factory.mktemp("disagg-mesh"),
        *("--prefill", "2", "--decode", "1"),
        redis=True,
        env={"SPLITSERVE_OTEL_EXPORTER": "console"},
    )
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
def reference_engine(smollm2_checkpoint: Checkpoint) -> LLMEngine:
    """The in-process engine on the same checkpoint: what every mesh must reproduce."""
    return create_engine(EngineConfig(kv_cache_memory_bytes=128 * MIB), smollm2_checkpoint)


@pytest.fixture(scope="session")
def tokenizer(smollm2_checkpoint: Checkpoint) -> Tokenizer:
    assert smollm2_checkpoint.tokenizer is not None
    return smollm2_checkpoint.tokenizer
