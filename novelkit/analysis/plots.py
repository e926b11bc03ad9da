"""PNG plots for reports: histograms of lengths, curves of several runs, stacked bars. Headless (Agg, no pyplot
state), ASCII labels (CJK fonts are often missing). Each function returns the matplotlib Figure, so callers and tests
can read its axes; save_figure writes it atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (7.0, 4.0)
DPI = 100


def _figure(title: str, xlabel: str, ylabel: str, size=SIZE) -> tuple[Figure, object]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def histogram(counts: dict[int, int], title: str, xlabel: str, ylabel: str = "count", bins: int = 60,
              markers: dict[str, float] | None = None) -> Figure:
    """A histogram of integer values given as {value: how many}; `markers` draws labelled vertical lines."""
    fig, ax = _figure(title, xlabel, ylabel)
    if counts:
        values = sorted(counts)
        # at most one bin per integer, so small ranges show no gaps between bars
        ax.hist(values, bins=min(bins, values[-1] - values[0] + 1), weights=[counts[v] for v in values],
                color="tab:blue")
    for i, (label, x) in enumerate((markers or {}).items()):
        ax.axvline(x, color=f"C{i + 1}", linestyle="--", label=label)
    if markers:
        ax.legend()
    return fig


def curves(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str, logy: bool = False) -> Figure:
    """One line per name: {name: (xs, ys)}."""
    fig, ax = _figure(title, xlabel, ylabel)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    if logy:
        ax.set_yscale("log")
    if len(series) > 3:  # many lines: the legend goes beside the plot, not over it
        fig.set_figwidth(10)
        fig.legend(loc="outside right center", fontsize="small")
    elif series:
        ax.legend()
    return fig


def stacked_bars(labels: list[str], parts: dict[str, list[float]], title: str, xlabel: str) -> Figure:
    """Horizontal bars, one per label, each the sum of the named parts."""
    fig, ax = _figure(title, xlabel, "", size=(8.0, 1.5 + 0.45 * len(labels)))
    left = [0.0] * len(labels)
    for name, values in parts.items():
        ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    fig.legend(loc="outside lower center", ncol=len(parts))
    return fig


def describe(fig: Figure) -> str:
    """What each plot shows, for the PNG's Description: title, axis labels and line names."""
    parts = []
    for ax in fig.axes:
        lines = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        parts.append(f"title: {ax.get_title()}; x: {ax.get_xlabel()}; y: {ax.get_ylabel()}"
                     + (f"; lines: {', '.join(lines)}" if lines else ""))
    return " | ".join(parts)


def save_figure(fig: Figure, path) -> None:
    """Write a PNG atomically (a temporary file in the same folder, then a rename), with its title and axes in the
    PNG's text metadata (Title, Description) so tools and tests can read what it shows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        title = fig.axes[0].get_title() if fig.axes else ""
        fig.savefig(tmp, format="png", metadata={"Title": title, "Description": describe(fig)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
