"""Line plots (the loss and persistence plots draw through ``save_line_plot``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .figure import new_figure, save_figure


@dataclass(frozen=True)
class Line:
    """One plotted series: ``y`` against ``x``, with its colour, width and legend label."""

    x: Sequence[float]
    y: Sequence[float]
    color: str
    width: float
    label: str


def save_line_plot(path: Path, lines: Sequence[Line], xlabel: str, ylabel: str, title: str) -> None:
    """Save a 700x360 PNG of ``lines`` (with a grid and a legend) to ``path`` atomically."""
    figure, axes = new_figure(7, 3.6)
    for line in lines:
        axes.plot(line.x, line.y, color=line.color, linewidth=line.width, label=line.label)
    save_figure(figure, axes, path, xlabel, ylabel, title, legend=True)
