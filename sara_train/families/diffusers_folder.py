"""Diffusers pipeline folders on disk: merging deltas into the UNet weights of a copy of one.

A diffusers folder holds ``model_index.json`` and one subfolder per component; the UNet's weights
are one ``.safetensors`` file or shards named by a ``*.safetensors.index.json``, possibly in several
variants (``diffusion_pytorch_model.fp16.safetensors``). Deltas are fitted to the UNet's diffusers
names through the engine's delta path, whatever naming they carry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..engine.apply import fit_delta
from ..engine.checkpoint import merge_checkpoint
from ..engine.delta import SparseDelta
from ..engine.errors import SaRAError
from ..engine.files import read_safetensors_header

PICKLED_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
"""UNet weight files a merged folder leaves out: never read, and they would be stale."""


def check_new_folder(out: Path, base: Path) -> None:
    """``SaRAError`` unless ``out`` is a new folder outside the folder ``base`` it is made from."""
    if out.exists() or out.is_symlink():
        raise SaRAError(f"output folder {out} already exists; give a new folder name")
    resolved_base = base.resolve()
    if resolved_base == out.resolve() or resolved_base in out.resolve().parents:
        raise SaRAError(f"output folder {out} is inside the base folder {base}; write the merged folder elsewhere")


def merge_diffusers_folder(
    base: Path,
    deltas: Sequence[SparseDelta],
    strengths: Sequence[float],
    out: Path,
    check_base: bool = True,
    allow_repeat: bool = False,
) -> Path:
    """Write a new diffusers folder ``out``: ``base`` with the deltas merged into its UNet weights.

    Every complete copy of the UNet weights in ``base/unet`` (one file, or the shards of one
    ``*.safetensors.index.json``; each variant such as fp16) is merged, streaming, shard by shard;
    all other files are copied. Pickled UNet weights (.bin) are left out. Keys, shapes and names
    are checked before anything is copied; the folder is built beside ``out`` and renamed into
    place, so ``out`` appears complete or not at all. Raises ``SaRAError`` if ``out`` exists or is
    inside ``base``, or ``base`` holds a symbolic-link loop.
    """
    unet_dir = base / "unet"
    if not (base / "model_index.json").is_file() or not (unet_dir / "config.json").is_file():
        raise SaRAError(f"{base} is not a diffusers pipeline folder (needs model_index.json and unet/config.json)")
    check_new_folder(out, base)
    plan: list[tuple[Path, list[SparseDelta]]] = []
    for group in unet_weight_groups(unet_dir):
        headers = [read_safetensors_header(path) for path in group]
        owner = {key: header for header in headers for key in header.tensors}
        shapes = {key: header.tensors[key].shape for key, header in owner.items()}
        matched = [fit_delta(delta, shapes, f"UNet weights {group[0]}") for delta in deltas]
        for header in headers:
            plan.append(
                (
                    header.path,
                    [
                        SparseDelta({k: v for k, v in d.layers.items() if owner[k] is header}, d.selection, d.metadata)
                        for d in matched
                    ],
                )
            )
    merged_names = {path.name for path, _ in plan}

    def skip_unet_weights(folder: Path, name: str) -> bool:
        return folder == unet_dir.resolve() and (name in merged_names or name.endswith(PICKLED_WEIGHT_SUFFIXES))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise SaRAError(f"could not write {out}: {error.strerror or error}") from None
    try:
        copy_folder(base, temp, skip_unet_weights)
        for path, parts in plan:
            if any(part.layers for part in parts):
                merge_checkpoint(
                    path, parts, temp / "unet" / path.name, list(strengths), check_base, allow_repeat=allow_repeat
                )
            else:
                shutil.copy2(path, temp / "unet" / path.name)
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def copy_folder(source: Path, target: Path, skip: Callable[[Path, str], bool]) -> None:
    """Copy the tree ``source`` into the existing folder ``target``, following symbolic links (a
    Hugging Face snapshot is made of them) but refusing a link back into a folder being copied;
    ``skip(resolved folder, name)`` leaves entries out. Raises ``SaRAError`` for a link loop or an
    unreadable or unwritable entry."""

    def copy(folder: Path, into: Path, ancestors: frozenset[Path]) -> None:
        resolved = folder.resolve()
        if resolved in ancestors:
            raise SaRAError(
                f"{folder} links back to a folder that contains it (a symbolic-link loop); sara-train will not copy it"
            )
        for entry in sorted(folder.iterdir()):
            if skip(resolved, entry.name):
                continue
            if entry.is_dir():
                (into / entry.name).mkdir()
                copy(entry, into / entry.name, ancestors | {resolved})
            else:
                shutil.copy2(entry, into / entry.name)

    try:
        copy(source, target, frozenset())
    except OSError as error:
        raise SaRAError(f"cannot copy {source}: {error}") from None


def unet_weight_groups(unet_dir: Path) -> list[list[Path]]:
    """Each complete copy of the UNet's safetensors weights: the shards named by one index file,
    or one unsharded file. Raises ``SaRAError`` if there is none."""
    groups: list[list[Path]] = []
    sharded: set[Path] = set()
    for index in sorted(unet_dir.glob("*.safetensors.index.json")):
        try:
            shards = sorted({unet_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SaRAError(f"{index}: not a valid safetensors index ({exc})") from None
        groups.append(shards)
        sharded.update(shards)
    groups += [[path] for path in sorted(unet_dir.glob("*.safetensors")) if path not in sharded]
    if not groups:
        raise SaRAError(f"{unet_dir} has no .safetensors weights (pickled .bin weights are never read)")
    return groups


def model_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the denoising model in ``path``, read from safetensors headers
    only: a single ``.safetensors`` file as it is (a checkpoint, a ComfyUI diffusion model), or a
    diffusers pipeline folder's ``unet/`` or ``transformer/`` weights (its first complete copy).
    ``SaRAError`` when the path is neither."""
    path = Path(path)
    if path.is_file():
        return {key: entry.shape for key, entry in read_safetensors_header(path).tensors.items()}
    for component in ("unet", "transformer"):
        if (path / component / "config.json").is_file():
            (group, *_) = unet_weight_groups(path / component)
            return {key: entry.shape for file in group for key, entry in read_safetensors_header(file).tensors.items()}
    raise SaRAError(f"{path}: not a .safetensors file nor a diffusers folder with unet/ or transformer/ weights")
