"""`splitserve generate` as a user runs it: a real process, real weights, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_generate_streams_a_greedy_answer(smollm2_checkpoint):
    proc = run_cli("generate", "What is the capital of France?", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model.gguf"], "no such model"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--device", "gpu"], "device must be cpu, cuda or cuda:N"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this one has a GPU"),
        ),
        (
            ["--tensor-parallel-timeout-s", "0"],
            "tensor_parallel_timeout_s must be a positive number",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    proc = run_cli("generate", "hi", *args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitserve: error:"), proc.stderr
    assert message in lines[0]


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = run_cli("generate", "hi", "--model", str(bad), timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_prompt_longer_than_the_context():
    proc = run_cli("generate", "word " * 9000, "--raw", timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "limit" in lines[0], proc.stderr
