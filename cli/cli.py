"""The `splitserve` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitserve import __version__


class CLIError(Exception):
    """Printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from splitserve import cmd_bench, cmd_generate

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("\nsplitserve: interrupted", file=sys.stderr)
        return 130
    except (
        CLIError,
        ValueError,
        OSError,
    ) as exc:  # ModelLoadError, RequestError, ... are ValueError
        print(f"splitserve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
