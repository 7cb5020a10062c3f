"""The logs of a run: the loss CSV (one row per optimizer step, plotted by ``sara_train.plots.loss``) and
the validation CSV (one row per validation)."""

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


@dataclass
class ValidationRow:
    """The validation loss after optimizer step ``step`` (see ``trainer.validation``)."""

    step: int
    loss: float


def read_rows(path: Path, row_type: type) -> list:
    """Rows of a CSV written by ``write_rows`` with the same ``row_type`` (empty if the file does not
    exist); each column is converted to its field's type."""
    if not path.exists():
        return []
    types = {spec.name: int if spec.type in (int, "int") else float for spec in fields(row_type)}
    with open(path, newline="") as file:
        return [row_type(**{name: types[name](value) for name, value in row.items()}) for row in csv.DictReader(file)]


def write_rows(path: Path, rows: list, row_type: type) -> None:
    """Write all ``rows`` (dataclasses of ``row_type``) to ``path`` atomically, with a header (a resumed
    run rewrites the file from its rows)."""
    with atomic_output(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([spec.name for spec in fields(row_type)])
        writer.writerows(astuple(row) for row in rows)


def read_loss_log(path: Path) -> list[LossRow]:
    """Rows of a loss CSV written by ``write_loss_log`` (empty if the file does not exist)."""
    return read_rows(path, LossRow)


def write_loss_log(path: Path, rows: list[LossRow]) -> None:
    """Write all ``rows`` to ``path`` atomically (a resumed run rewrites the file from its rows)."""
    write_rows(path, rows, LossRow)
