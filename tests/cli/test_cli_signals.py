"""SIGTERM to a `splitserve` command unwinds it like Ctrl-C: its `with` blocks (a benchmark's
meshes, a pipeline's stages) stop what they started, and it exits 130 with one line."""

from __future__ import annotations

import subprocess
import sys

# A command that starts something (here: a marker file it cleans up on the way out) and then
# blocks, registered in place of the real parser so the test needs no model.
SCRIPT = """
import argparse, importlib, os, signal, sys, time
cli = importlib.import_module("splitserve.cli.main")  # the module (the package exports main)

def run(args):
    with open(args.marker, "w"):
        pass
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a supervisor sends
        time.sleep(30)
        return 0
    finally:
        os.remove(args.marker)  # a mesh's stop() in the real commands

def parser():
    p = argparse.ArgumentParser()
    p.add_argument("marker")
    p.set_defaults(run=run)
    return p

cli.build_parser = parser
code = cli.main([sys.argv[1]])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler was not restored"
sys.exit(code)
"""


def test_sigterm_unwinds_the_command_and_exits_130(tmp_path):
    marker = tmp_path / "running"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(marker)], capture_output=True, text=True, timeout=25
    )
    assert done.returncode == 130, done.stderr
    assert "splitserve: interrupted" in done.stderr
    assert not marker.exists()  # the finally block ran
