"""The `splitserve` command: it parses the command line and calls the package that does the
work (launcher, executors, bench, planner, or a service's `__main__`); no logic of its own."""

from splitserve.cli.main import CLIError, __version__, build_parser, main

__all__ = ["CLIError", "__version__", "build_parser", "main"]
