"""The gRPC stubs are a build product: importing splitserve.v1 never generates them, a missing
stub asks for a reinstall, and scripts/check-stubs.py (run by scripts/test.sh) fails on a .proto
that no longer makes the installed stubs.

Each case runs a real interpreter in a subprocess: the test session has long imported
splitserve.v1, and the check is a script, judged by its exit status and its one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import splitserve.v1

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos" / "splitserve" / "v1"


def run_python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_importing_never_runs_protoc():
    # grpc_tools set to None in sys.modules: any import of it raises, so protoc cannot run.
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "from splitserve.v1 import pb, rpc\n"
        "assert pb.SamplingOptions(max_tokens=3).max_tokens == 3 and rpc.InferenceStub\n"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr


def test_missing_stubs_ask_for_a_reinstall(tmp_path):
    package = tmp_path / "splitserve" / "v1"  # `splitserve` a namespace, as installed
    package.mkdir(parents=True)
    shutil.copy(splitserve.v1.__file__, package / "__init__.py")  # and no stubs beside it
    # -S: no site-packages, so the installed splitserve.v1 cannot be found instead.
    done = run_python("-S", "-c", "import splitserve.v1", cwd=tmp_path, env={"PYTHONPATH": "."})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: splitserve.v1: the generated gRPC stubs are missing")
    assert "(splitserve.v1.splitserve_pb2)" in last and "reinstall" in last
    assert "pip install -e ." in last


def checkout_copy(root: Path) -> Path:
    """The check script and the .proto with its generator, as a checkout holds them."""
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check-stubs.py", root / "scripts")
    protos = root / "protos" / "splitserve" / "v1"
    protos.mkdir(parents=True)
    for name in ("__init__.py", "_build.py", "splitserve.proto"):
        shutil.copy(PROTOS / name, protos)
    return protos / "splitserve.proto"


def test_the_check_fails_on_a_proto_the_installed_stubs_do_not_match(tmp_path):
    proto = checkout_copy(tmp_path)
    check = str(tmp_path / "scripts" / "check-stubs.py")
    installed = Path(splitserve.v1.pb.__file__).parent

    same = run_python(check)
    assert same.returncode == 0, same.stderr
    assert same.stdout == f"check-stubs: the stubs in {installed} match the committed .proto\n"

    # Only a comment: a service's comment becomes the docstring of its stubs.
    text = proto.read_text()
    service = "\nservice Inference {\n"
    assert text.count(service) == 1
    proto.write_text(text.replace(service, "\n// The public API.\nservice Inference {\n"))
    changed = run_python(check)
    assert changed.returncode == 1
    assert changed.stdout == ""
    assert changed.stderr == (
        f"check-stubs: {installed / 'splitserve_pb2_grpc.py'} differs from what {proto} "
        "generates; reinstall splitserve (pip install -e ., or scripts/setup.sh)\n"
    )
