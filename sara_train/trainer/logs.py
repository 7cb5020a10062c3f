"""The loss log of a run: one CSV row per optimizer step (plotted by ``sara_train.plots.loss``)."""

from __future__ import annotations

import csv
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from ..engine.files import atomic_output


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
        return [
            LossRow(
                int(row["step"]),
                float(row["loss"]),
                float(row["rank_loss"]),
                float(row["learning_rate"]),
                float(row["seconds"]),
            )
            for row in csv.DictReader(file)
        ]


def write_loss_log(path: Path, rows: list[LossRow]) -> None:
    """Write all ``rows`` to ``path`` atomically (a resumed run rewrites the file from its rows)."""
    with atomic_output(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([spec.name for spec in fields(LossRow)])
        writer.writerows(astuple(row) for row in rows)
