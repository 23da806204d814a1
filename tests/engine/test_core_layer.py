"""The engine core stays single-process: no module in engine/ touches torch.distributed.

import-linter's contracts (pyproject.toml) can forbid only whole external packages, and the
core does need torch, so this reads every engine/*.py itself: an import of torch.distributed in
any spelling, or an attribute path through it (`torch.distributed.barrier()`), fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import splitserve.engine

FORBIDDEN = "torch.distributed"
ENGINE_DIR = Path(splitserve.engine.__file__).parent
MODULES = sorted(ENGINE_DIR.glob("*.py"))


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _reaches(name: str) -> bool:
    return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def distributed_uses(source: str) -> list[int]:
    """Line numbers of the imports and attribute paths that reach torch.distributed."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node) or ""]
        else:
            continue
        if any(_reaches(name) for name in names):
            lines.append(node.lineno)
    return lines


def test_the_engine_folder_is_found():
    assert {"engine.py", "scheduler.py", "block_manager.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_engine_module_uses_torch_distributed(path: Path):
    lines = distributed_uses(path.read_text())
    assert not lines, f"{path.name} reaches {FORBIDDEN} at lines {lines}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed",
        "import torch.distributed as dist",
        "import torch.distributed.rpc",
        "from torch import distributed",
        "from torch import nn, distributed as dist",
        "from torch.distributed import ProcessGroup",
        "from torch.distributed.rpc import remote",
        "import torch\ntorch.distributed.barrier()",
    ],
)
def test_every_spelling_is_caught(source: str):
    assert distributed_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nimport torch.nn.functional as F",
        "from torch import nn",
        "import torch_distributed_helpers",
        '"""No torch.distributed here."""',
    ],
)
def test_what_is_allowed_passes(source: str):
    assert not distributed_uses(source)
