"""What every benchmark's report is made of, so each benchmark writes only its own tables.

A benchmark ends the same way every time (`finish`): its report lines, then the JSON document
if `--json PATH` asked for one (`json_document`: the settings and the machine beside the results),
then the plot if `--plot PATH` asked for one (`save_plot`: matplotlib is optional, and a machine
without it still gets its numbers), and last the one `key: value` line (`final_line`) that
scripts, CI and docs/benchmarks.md read. The rest are the pieces the tables share: the
machine's description, column layout, number formats, and summary statistics of latencies.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 1024 * 1024


# ---- the machine ---------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """The CPU, its logical CPUs, torch's threads and the library versions of this run."""
    import os
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def load_note(loadavg: dict[str, float], busy_cpus: int | None = None) -> str:
    """The 1-minute load average over the phase starts, for the machine line. With `busy_cpus`,
    a first phase that started with more than half of them busy is flagged: another process
    was already running."""
    if not loadavg:
        return ""
    note = (
        f"; 1-min load average at phase starts {min(loadavg.values()):.1f}-"
        f"{max(loadavg.values()):.1f}"
    )
    first = next(iter(loadavg.values()))
    if busy_cpus and first > 0.5 * busy_cpus:
        note += " (busy before the run started: expect noise)"
    return note


# ---- tables and numbers --------------------------------------------------------------------
def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to fit; the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; "-" when it wasn't measured."""
    return "-" if x is None else f"{100 * x:.1f}%"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}"


def mib(num_bytes: int) -> str:
    return f"{num_bytes / MIB:,.0f} MiB"


def times(x: float) -> str:
    """A ratio as a multiple: 1.50x."""
    return f"{x:.2f}x"


def final_line(key: str, value: float | bool) -> str:
    """The benchmark's last line: `key: X.XX` (or `key: true|false`)."""
    if isinstance(value, bool):
        return f"{key}: {'true' if value else 'false'}"
    return f"{key}: {value:.2f}"


# ---- statistics ----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank floor(q x n) of the sorted values (the largest for q near 1); 0 when
    there are none. With a handful of samples, p99 is simply the slowest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class LatencyStats:
    n: int
    mean: float
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> LatencyStats:
        if not xs:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        return cls(len(xs), statistics.fmean(xs), statistics.median(xs), min(xs), max(xs))


# ---- the ending ----------------------------------------------------------------------------
def json_document(settings: Any, **parts: Any) -> dict[str, Any]:
    """A benchmark's JSON: its settings (a dataclass) and this machine, then its results."""
    return {"settings": asdict(settings), "machine": machine_info(), **parts}


def write_json(path: str, doc: Any) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def save_plot(path: str, size: tuple[float, float], draw: Callable[[Figure], object]) -> bool:
    """A PNG of whatever `draw` puts on a figure of `size` inches. matplotlib is a development
    dependency: without it, say so on stderr and write nothing (False)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"no plot written to {path}: matplotlib is not installed", file=sys.stderr)
        return False
    fig = Figure(figsize=size, layout="constrained")
    draw(fig)
    fig.savefig(path, dpi=120)
    return True


def label_bars(ax: Axes, labels: Iterable[tuple[float, float, str]]) -> None:
    """Text centred above each bar: (x, bar height, text)."""
    for x, y, text in labels:
        ax.annotate(text, (x, y), ha="center", va="bottom")


def finish(
    args: Any,
    lines: Iterable[str],
    final: str,
    doc: Callable[[], Any] | None = None,
    plot: Callable[[str], object] | None = None,
) -> None:
    """Print the report; write the JSON document to `args.json` and the plot to `args.plot`
    where the command line asked for them; print `final` last."""
    print("\n".join(lines))
    if getattr(args, "json", None) and doc is not None:
        write_json(args.json, doc())
    if getattr(args, "plot", None) and plot is not None:
        plot(args.plot)
    print(final)
