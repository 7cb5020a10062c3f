"""The training-loss plot (raw and smoothed) that ``sara-train train`` and the demo write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..engine.files import atomic_output

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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 3.6), dpi=100)
    axes.plot(steps, losses, color="#9db4e0", linewidth=0.8, label="loss")
    axes.plot(steps, smoothed(list(losses)), color="#1f4fb4", linewidth=1.8, label=f"smoothed ({SMOOTHING})")
    axes.set_xlabel("step")
    axes.set_ylabel("denoising loss (MSE)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png")
    pyplot.close(figure)
