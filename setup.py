"""Only here to generate the gRPC stubs from protos/ as part of every build.

build_py runs for `pip install .` (and wheels) and `pip install -e .` alike. A regular build
writes the stubs into the build folder, next to the copied sources, so the wheel carries them
and the checkout is left alone; an editable install imports from the checkout, so there they
are written next to the .proto. Either way from protos/splitserve/v1/_build.py, the generator
that scripts/check-stubs.py runs too. grpcio-tools comes from [build-system] requires.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

STUBS_PACKAGE = "splitserve.v1"


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()  # returns at once in editable mode: nothing is copied then
        source = self.get_package_dir(STUBS_PACKAGE)
        if self.editable_mode:
            out_dir = source
        else:
            out_dir = os.path.join(self.build_lib, *STUBS_PACKAGE.split("."))
        spec = importlib.util.spec_from_file_location(
            "_splitserve_proto_build", os.path.join(source, "_build.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(out_dir)


setup(cmdclass={"build_py": BuildWithStubs})
