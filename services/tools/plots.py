"""Figures of the benchmarks: `slotmesh bench … --plot FILE.png`.

Each bench module turns its JSON report into a `Chart` (lines of measured points) and
`render` draws it with matplotlib, an optional dependency (the `plot` extra).
`--plot` checks for matplotlib when the flags are parsed, so a missing extra stops the
command before a long run, not after it. scripts/doc_plots.py feeds the same chart
functions the figures recorded in docs/benchmarks.md, so a PNG in the docs is what
`--plot` draws for those numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

MISSING = ("needs matplotlib, the `plot` extra: pip install 'slotmesh[plot]' "
           "(in a checkout: pip install -e '.[plot]')")


@dataclass(frozen=True, slots=True, kw_only=True)
class Series:
    label: str
    points: tuple[tuple[float, float], ...]  # (x, y), x ascending
    dashed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """A horizontal (a limit) or vertical (a measured threshold) reference line."""
    at: float
    label: str
    vertical: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Chart:
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    lines: tuple[Line, ...] = ()
    logx: bool = False  # levels such as 1, 4, 16 or 256 … 4096 sit evenly
    logy: bool = False
    note: str = ""  # a line under the title: the run's conditions


def series(label: str, table: dict, y_of, *, dashed: bool = False) -> Series:
    """A Series from a report's {"x": row} table (JSON keys are strings)."""
    points = sorted((float(x), float(y_of(row))) for x, row in table.items())
    return Series(label=label, points=tuple(points), dashed=dashed)


def _pyplot():
    """pyplot on the file-only Agg backend (ImportError without the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_path(text: str) -> Path:
    """argparse type of --plot: a .png path, with matplotlib there to draw it."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: the figure is a PNG; name it FILE.png")
    try:
        _pyplot()
    except ImportError as e:
        raise argparse.ArgumentTypeError(MISSING) from e
    return path


def add_plot_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--plot", type=plot_path, metavar="FILE.png", default=None,
                        help=f"also draw {what} into FILE.png (needs the `plot` extra: "
                             f"matplotlib)")


def render(chart: Chart, path: Path) -> Path:
    """Draw `chart` into the PNG `path` (no timestamp or version in the file: the same
    numbers give the same bytes with the same matplotlib)."""
    try:
        plt = _pyplot()
    except ImportError as e:
        from worker.vocab.errors import InvalidRequestError

        raise InvalidRequestError("--plot", MISSING) from e
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for s in chart.series:
            xs, ys = zip(*s.points, strict=True)
            ax.plot(xs, ys, "--o" if s.dashed else "-o", label=s.label, markersize=4)
        for line in chart.lines:
            draw = ax.axvline if line.vertical else ax.axhline
            draw(line.at, color="grey", linestyle=":", linewidth=1)
            if line.vertical:
                ax.annotate(line.label, (line.at, 0.02), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color="grey", ha="right", va="bottom")
            else:
                ax.annotate(line.label, (0.01, line.at), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
        if chart.logx:
            ax.set_xscale("log", base=2)
            xs = sorted({x for s in chart.series for x, _ in s.points})
            ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
            ax.minorticks_off()
        if chart.logy:
            ax.set_yscale("log")
        ax.set_title(chart.title + (f"\n{chart.note}" if chart.note else ""), fontsize=10)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
