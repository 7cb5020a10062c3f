"""Where the nodes write: checked plain file names and the ``models/sara`` folder."""
from __future__ import annotations

import os

import folder_paths


def plain_file_name(name: str, what: str) -> str:
    """``name`` if it is a plain file name (no folder part, not hidden); else ``ValueError`` naming ``what``."""
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"{what} must be a plain file name, got {name!r}")
    return name


def sara_folder() -> str:
    """The first ``models/sara`` folder ComfyUI knows, created if missing."""
    folder = folder_paths.get_folder_paths("sara")[0]
    os.makedirs(folder, exist_ok=True)
    return folder
