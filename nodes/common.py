"""What the nodes share: the custom types, the "none" choice, and where and under which names files
are written (one policy for every node that saves: ComfyUI's own numbering)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

NONE = "[None]"
"""The choice that leaves an optional file input empty."""
SARA_DELTA = io.Custom("SARA_DELTA")
"""A ``sara_train.SparseDelta`` passed between nodes."""
LOSS_MAP = getattr(io, "LossMap", None) or io.Custom("LOSS_MAP")
"""``{"loss": [floats]}``: ComfyUI's own type where it has one (the built-in loss-graph node reads it)."""


def sara_folder() -> str:
    """The first ``models/sara`` folder ComfyUI knows, created if missing."""
    folder = folder_paths.get_folder_paths("sara")[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def numbered_path(folder: str, prefix: str, tag: str = "") -> str:
    """The next ``<prefix>_<NNNNN>_<tag>.safetensors`` in ``folder``, numbered the way ComfyUI's own
    savers number their files (``folder_paths.get_save_image_path``: past every existing number for
    that prefix, so nothing is overwritten). ``prefix`` may name a subfolder (created); a prefix
    that leads outside ``folder``, or is empty or hidden, raises ``ValueError``."""
    name = os.path.basename(os.path.normpath(prefix)) if prefix else ""
    if not name or name.startswith("."):
        raise ValueError(f"filename prefix must name a file, got {prefix!r}")
    folder = os.path.abspath(folder)
    try:
        full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, folder)
    except Exception:  # ComfyUI raises a bare Exception for a prefix that escapes the folder
        raise ValueError(f"filename prefix {prefix!r} leads outside {folder}") from None
    os.makedirs(full_folder, exist_ok=True)
    return os.path.join(full_folder, f"{filename}_{counter:05}_{tag}.safetensors")
