"""Experiment trackers: the run's scalars and sample images in TensorBoard or Weights & Biases.

``open_tracker(kind, ...)`` gives a ``Tracker`` (or None for ``"none"``). Only the main process
logs. Each backend is imported when chosen and named in a ``SaRAError`` if it is not installed
(``pip install tensorboard`` / ``pip install wandb``). A resumed run continues the same record:
TensorBoard drops the events after the resume point (``purge_step``), W&B resumes the run id kept in
the output folder.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..engine.errors import SaRAError

TRACKERS = ("none", "tensorboard", "wandb")
TENSORBOARD_FOLDER = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


class Tracker(Protocol):
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...

    def log_image(self, step: int, name: str, image: Image.Image) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``<output_dir>/tensorboard`` (open with ``tensorboard --logdir``)."""

    def __init__(self, output_dir: Path, resumed_at: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SaRAError("--log-with tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(
            str(output_dir / TENSORBOARD_FOLDER), purge_step=resumed_at + 1 if resumed_at else None
        )

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run stored under ``<output_dir>/wandb`` (online, or offline with ``WANDB_MODE=offline``),
    its id kept in ``wandb_run_id.txt`` so that ``--resume`` continues it."""

    def __init__(self, output_dir: Path, config: dict, resumed_at: int) -> None:
        try:
            import wandb
        except ImportError:
            raise SaRAError("--log-with wandb needs the wandb package: pip install wandb") from None
        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed_at and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project="sara-train", dir=str(output_dir), id=run_id, resume="allow", config=config)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, step: int, name: str, image: Image.Image) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, output_dir: Path, config: dict, resumed_at: int) -> Tracker | None:
    """The tracker ``kind`` (one of ``TRACKERS``) for the run in ``output_dir``; None for "none".
    ``resumed_at``: the step a resumed run continues from (0 for a new run)."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(output_dir, resumed_at)
    if kind == "wandb":
        return WandbTracker(output_dir, config, resumed_at)
    raise SaRAError(f"--log-with must be one of {', '.join(TRACKERS)}, got {kind!r}")
