"""CUDA tests: collected only by bench/gpu_check.sh (SPLITSERVE_GPU_TESTS=1) on a GPU machine.

CI machines have no GPU, so the default run does not collect these files at all (the CPU
paths they mirror are tested in tests/engine). When asked for, a missing GPU is a failure,
never a skip.
"""

from __future__ import annotations

import os

import pytest

GPU_RUN = os.environ.get("SPLITSERVE_GPU_TESTS") == "1"
collect_ignore_glob = [] if GPU_RUN else ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.fail("SPLITSERVE_GPU_TESTS=1 but torch sees no CUDA device")
