"""CI: the gRPC stubs the installed splitserve imports are the ones the committed .proto makes.

Regenerates the stubs from this checkout's protos/splitserve/v1/splitserve.proto into a
temporary folder, with the generator the build runs (protos/splitserve/v1/_build.py, loaded by
path like setup.py does), and compares them byte for byte with the files in the folder the
installed package `splitserve.v1` imports its stubs from. The stubs are generated with the
include root and proto name relative to it, so the temporary path never appears in them and
nothing needs ignoring. The folder is found without importing splitserve.v1, so stubs too stale
to import are reported like any other difference. Fails with one line naming the first file
that differs; the fix is to reinstall (`pip install -e .`, or scripts/setup.sh).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATOR = os.path.join(ROOT, "protos", "splitserve", "v1", "_build.py")
REINSTALL = "reinstall splitserve (pip install -e ., or scripts/setup.sh)"


def load_generator():
    spec = importlib.util.spec_from_file_location("_splitserve_proto_build", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_stubs_dir() -> str | None:
    spec = importlib.util.find_spec("splitserve.v1")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def first_difference(generator, installed: str) -> str | None:
    """A one-line description of the first stub that differs, None when all match."""
    with tempfile.TemporaryDirectory() as tmp:
        generator.generate(tmp)
        for name in generator.OUTPUTS:
            target = os.path.join(installed, name)
            found = read(target)
            if found is None:
                return f"{target} is missing"
            if found != read(os.path.join(tmp, name)):
                return f"{target} differs from what {generator.PROTO} generates"
    return None


def main() -> int:
    installed = installed_stubs_dir()
    if installed is None:
        print(f"check-stubs: splitserve.v1 is not installed; {REINSTALL}", file=sys.stderr)
        return 1
    problem = first_difference(load_generator(), installed)
    if problem is not None:
        print(f"check-stubs: {problem}; {REINSTALL}", file=sys.stderr)
        return 1
    print(f"check-stubs: the stubs in {installed} match the committed .proto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
