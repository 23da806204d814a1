"""Only here to generate the gRPC stubs from protos/ as part of every build."""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self) -> None:
        path = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "protos", "splitserve", "v1", "_build.py"
        )
        spec = importlib.util.spec_from_file_location("_splitserve_proto_build", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.ensure_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
