"""A labelled scatter with error bars: e.g. style fit against prior drift, one point per method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .figure import new_figure, save_figure


@dataclass(frozen=True)
class Point:
    """One labelled point: ``(x, y)`` with standard deviations ``x_std``, ``y_std`` drawn as bars."""

    label: str
    x: float
    y: float
    x_std: float
    y_std: float


def plot_tradeoff(path: Path, points: Sequence[Point], xlabel: str, ylabel: str, title: str) -> None:
    """Save a 700x500 PNG of ``points`` (each labelled next to its marker) to ``path`` atomically."""
    from matplotlib import colormaps

    figure, axes = new_figure(7, 5)
    colors = colormaps["tab10"]
    for index, point in enumerate(points):
        color = colors(index % 10)
        axes.errorbar(point.x, point.y, xerr=point.x_std, yerr=point.y_std, fmt="o", color=color, capsize=3)
        axes.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    save_figure(figure, axes, path, xlabel, ylabel, title, legend=False)
