"""Benchmarks (`splitserve bench ...`): each prints ratios against a baseline measured in the
same run, and the fault suite (faults.py) prints what clients saw when services failed."""


class BenchError(Exception):
    """A benchmark that can't run as asked, in one line (the CLI exits with status 2)."""
