"""What every matplotlib plot here shares: an Agg figure, labelled axes with a grid, an atomic PNG save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.files import atomic_output


def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """``(figure, axes)`` of ``width`` x ``height`` inches at 100 dpi. Imports matplotlib (Agg) on
    first use."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(width, height), dpi=100)


def save_figure(figure: Any, axes: Any, path: Path, xlabel: str, ylabel: str, title: str, legend: bool) -> None:
    """Label ``axes``, add a grid (and the legend), write ``figure`` to ``path`` as PNG atomically, close it."""
    from matplotlib import pyplot

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if legend:
        axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png")
    pyplot.close(figure)
