"""The `splitserve` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from splitserve.bench import BenchError
from splitserve.launcher import LaunchError

__version__ = "0.1.0"


class CLIError(Exception):
    """Printed as one line, exit status 2."""


# `splitserve NAME ARGS...` runs `python -m splitserve.NAME ARGS...` in this process. Each
# package is imported only when its command runs, so `--help` stays fast and works even where
# a service isn't installed.
SERVICES = {
    "kvstore": "run the KV-block store service",
    "prefill": "run a prefill worker",
    "decode": "run a decode (or colocated) worker",
    "router": "run the router (gRPC + OpenAI-compatible HTTP)",
}


def run_service(name: str, argv: Sequence[str]) -> int:
    import importlib

    module_name = f"splitserve.{name}.__main__"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CLIError(f"the {name} service is not installed ({module_name})") from None
        raise
    return int(module.main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    from splitserve.cli import cmd_bench, cmd_certs, cmd_generate, cmd_plan, cmd_up

    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Disaggregated LLM inference: a router, prefill and decode workers and a "
        "prefix KV-cache store as gRPC services. Runs on the embedded default model "
        "(SmolLM2-135M-Instruct) unless --model names another.",
    )
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd_generate.add_parser(sub)
    cmd_bench.add_parser(sub)
    cmd_up.add_parser(sub)
    cmd_plan.add_parser(sub)
    cmd_certs.add_parser(sub)
    for name, help_text in SERVICES.items():
        # Listed for --help only: main() hands these commands' arguments over untouched.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    try:
        if argv and argv[0] in SERVICES:
            return run_service(argv[0], argv[1:])
        if threading.current_thread() is threading.main_thread():
            # SIGTERM unwinds like Ctrl-C, so a benchmark's meshes and stages are stopped on
            # the way out instead of left running (`up` installs its own for its drain).
            previous = signal.signal(signal.SIGTERM, _interrupted)
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("\nsplitserve: interrupted", file=sys.stderr)
        return 130
    except (CLIError, LaunchError, BenchError, ValueError, OSError) as exc:
        # ModelLoadError, RequestError, ... are ValueError
        print(f"splitserve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
