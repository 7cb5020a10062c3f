"""The training-loss plot (raw and smoothed) that ``sara-train train`` and the demo write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .lines import Line, save_line_plot

SMOOTHING = 0.9


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    result, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        result.append(average / (1 - factor**i))
    return result


def plot_loss(path: Path, steps: Sequence[int], losses: Sequence[float], title: str = "SaRA training loss") -> None:
    """Save a PNG of the loss per step (raw and smoothed) to ``path`` atomically. Imports
    matplotlib (Agg) on first use."""
    lines = [
        Line(steps, losses, "#9db4e0", 0.8, "loss"),
        Line(steps, smoothed(list(losses)), "#1f4fb4", 1.8, f"smoothed ({SMOOTHING})"),
    ]
    save_line_plot(path, lines, "step", "denoising loss (MSE)", title)
