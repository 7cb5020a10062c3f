"""The loss log of a run: one CSV row per optimizer step, and a PNG plot of it."""
from __future__ import annotations

import csv
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from ..files import atomic_output

SMOOTHING = 0.9


@dataclass
class LossRow:
    """One optimizer step: the denoising loss (mean over the step's micro-batches and processes),
    the rank loss ``||ΔP||_*`` (before its weight), the learning rate and wall seconds since start."""

    step: int
    loss: float
    rank_loss: float
    learning_rate: float
    seconds: float


def read_loss_log(path: Path) -> list[LossRow]:
    """Rows of a loss CSV written by ``write_loss_log`` (empty if the file does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [LossRow(int(row["step"]), float(row["loss"]), float(row["rank_loss"]),
                        float(row["learning_rate"]), float(row["seconds"])) for row in csv.DictReader(file)]


def write_loss_log(path: Path, rows: list[LossRow]) -> None:
    """Write all ``rows`` to ``path`` atomically (a resumed run rewrites the file from its rows)."""
    with atomic_output(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([spec.name for spec in fields(LossRow)])
        writer.writerows(astuple(row) for row in rows)


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    result, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        result.append(average / (1 - factor ** i))
    return result


def plot_loss(path: Path, rows: list[LossRow], title: str = "SaRA training loss") -> None:
    """Save a PNG of the loss per step (raw and smoothed) to ``path`` atomically."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    steps = [row.step for row in rows]
    losses = [row.loss for row in rows]
    figure, axes = pyplot.subplots(figsize=(7, 3.6), dpi=100)
    axes.plot(steps, losses, color="#9db4e0", linewidth=0.8, label="loss")
    axes.plot(steps, smoothed(losses), color="#1f4fb4", linewidth=1.8, label=f"smoothed ({SMOOTHING})")
    axes.set_xlabel("step")
    axes.set_ylabel("denoising loss (MSE)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png")
    pyplot.close(figure)
