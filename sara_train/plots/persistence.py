"""The Sec. 3.2 plot: where the below-threshold weights come from while a model keeps training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .lines import Line, save_line_plot


def plot_persistence(
    path: Path, steps: Sequence[int], still_small: Sequence[float], newly_small: Sequence[float], title: str
) -> None:
    """Save a PNG to ``path`` atomically: per step, the share of all targeted weights below the fixed
    threshold that were below it at step 0 (``still_small``) and that were not (``newly_small``),
    both given as fractions of all targeted weights and plotted in %."""
    lines = [
        Line(steps, [100 * v for v in still_small], "#1f4fb4", 1.8, "small at step 0, still small"),
        Line(steps, [100 * v for v in newly_small], "#e0a31f", 1.8, "newly small"),
    ]
    save_line_plot(path, lines, "step of continued pretraining", "share of all targeted weights (%)", title)
