"""`splitserve plan` as a user runs it: a real process, the key lines, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "plan", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


ARTICLE = ["--model", "llama-3-70b", "--gpu", "h100", "--context", "4096", "--batch", "32"]


def test_article_example_prints_the_key_lines():
    proc = run_cli(*ARTICLE)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (
        "parameters   70,553,706,496 (70.55 B)",
        "weights      141.11 GB (fp16, 2 B/param)",
        "327,680 B/token (2 x 80 layers x 8 KV heads x 128 x 2 B)",
        "42.95 GB (40.00 GiB)",
        "total        184.06 GB",
        "does not fit: 184.06 GB > 72.00 GB usable",
        "one-GPU rate 23.7 forward passes/s",
        "TP=4 x PP=1 = 4 GPUs: 46.02 GB per GPU",
        "95.0 forward passes/s (memory bandwidth bound",
        "3,039 tokens/s decode at batch 32",
        "912-1,215 tokens/s",
        "$3.29/M output tokens at the ceiling, $8.23-$10.97/M realistic",
        "about 23",
        "30-40 GB",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert proc.stderr == ""


def test_docs_worked_example_is_the_live_output():
    doc = (Path(__file__).parents[2] / "docs" / "planning.md").read_text()
    start = doc.index("$ splitserve plan --model llama-3-70b --gpu h100 --context 4096 --batch 32")
    example = doc[start:].split("\n", 1)[1].split("```", 1)[0]
    assert run_cli(*ARTICLE).stdout == example


def test_json_output():
    proc = run_cli(*ARTICLE, "--json", "--gpu-hour-usd", "8", "--weight-dtype", "fp8")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"]["total"] == 70_553_706_496
    assert data["weight_bytes"] == 70_553_706_496 * 1
    assert data["usd_per_gpu_hour"] == 8.0
    # fp8 weights (70.55 GB) + KV 42.95 GB = 113.5 GB: TP=2 gives 56.8 GB per GPU
    assert (data["layout"]["tp"], data["layout"]["pp"]) == (2, 1)


def test_gguf_default_model_same_numbers_as_builtin():
    from splitserve.model.loader import default_model_path

    common = ["--gpu", "l4", "--context", "8192", "--batch", "16", "--json"]
    by_file = json.loads(run_cli("--model", default_model_path(), *common).stdout)
    builtin = json.loads(run_cli("--model", "smollm2-135m", *common).stdout)
    assert by_file["params"] == builtin["params"]
    assert by_file["params"]["total"] == 134_515_008
    assert by_file["layout"] == builtin["layout"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--gpu": "h1000"}, "unknown GPU 'h1000'"),
        ({"--context": "-4096"}, "context must be a positive integer"),
        ({"--batch": "0"}, "batch must be a positive integer"),
        ({"--model": "gpt-9"}, "unknown model 'gpt-9'"),
        ({"--model": "/nonexistent/llama/config.json"}, "no such model file or folder"),
        ({"--kv-dtype": "fp4"}, "unknown KV dtype"),
        ({"--headroom": "1.5"}, "headroom"),
        ({"--headroom": "lots"}, "--headroom must be a number, got 'lots'"),
        ({"--gpu-hour-usd": "free"}, "--gpu-hour-usd must be a number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(change, message):
    args = dict(zip(ARTICLE[::2], ARTICLE[1::2], strict=True))
    args.update(change)
    proc = run_cli(*[x for kv in args.items() for x in kv])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitserve: error:"), proc.stderr
    assert message in lines[0]
    assert proc.stdout == ""


def test_help_lists_the_choices():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "llama-3-405b" in proc.stdout and "mi300x" in proc.stdout
