"""One way to draw a line plot to a PNG (matplotlib, Agg), shared by the plots that are lines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..engine.files import atomic_output


@dataclass(frozen=True)
class Line:
    """One plotted series: ``y`` against ``x``, with its colour, width and legend label."""

    x: Sequence[float]
    y: Sequence[float]
    color: str
    width: float
    label: str


def save_line_plot(path: Path, lines: Sequence[Line], xlabel: str, ylabel: str, title: str) -> None:
    """Save a 700x360 PNG of ``lines`` (with a grid and a legend) to ``path`` atomically. Imports
    matplotlib (Agg) on first use."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 3.6), dpi=100)
    for line in lines:
        axes.plot(line.x, line.y, color=line.color, linewidth=line.width, label=line.label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png")
    pyplot.close(figure)
