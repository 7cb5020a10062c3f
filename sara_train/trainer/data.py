"""The training image folder: find images and their captions, check they decode, and turn them into
square pixel tensors.

Two folder conventions are read (``scan_dataset``):

* **kohya**: each image ``name.png`` has a caption file ``name.txt`` beside it (the extension is
  ``caption_extension``). Only the folder's top level is scanned (subfolders are not), images are
  ``.png .jpg .jpeg .webp .bmp`` in any letter case, sorted by file name; names starting with ``.``
  (hidden files, macOS ``._name.png`` resource forks) are skipped.
* **diffusers**: a ``metadata.jsonl`` in the folder, one JSON object a line,
  ``{"file_name": "a.png", "text": "a caption"}`` (``"caption"`` is accepted instead of ``"text"``).
  ``file_name`` is relative to the folder and may name a subfolder. Items keep the file's line order;
  images the file does not list are not used. When ``metadata.jsonl`` exists, caption files are ignored.

An empty caption (an empty ``.txt`` or ``"text": ""``) is allowed: it trains on the empty prompt
(or on the trigger word alone when ``caption_prefix`` is given).

Images become training pixels (``load_image``) the way the diffusers training scripts do it: EXIF
orientation applied, transparency composited on white, resized so the short side equals the
resolution, cropped to a square (center or random), optionally mirrored left-right. With
aspect-ratio buckets (``bucket_sizes``) an image is instead resized to just cover the bucket size
nearest its aspect ratio and cropped to it. The resize and the crop are one resampling of the
view's region only (``ResizePlan``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from ..engine.errors import SaRAError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
CropMode = Literal["center", "random"]
CROP_MODES: tuple[str, ...] = ("center", "random")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetItem:
    """One training image and its caption (``caption_prefix`` already applied)."""

    image_path: Path
    caption: str


@dataclass
class LoadedImage:
    """One training view of an image (a square, or an aspect-ratio bucket's size).

    ``pixels``: [3, H, W] float32 in [-1, 1], RGB.
    ``original_size``: (height, width) of the image file after EXIF rotation, before resizing.
    ``crop_top_left``: (y, x) of the view's corner in the resized image; for a mirrored view it is
    measured in the mirrored resized image (as the diffusers SDXL script does: flip, then crop).
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def with_prefix(caption_prefix: str, caption: str) -> str:
    """``"prefix, caption"`` when both are non-empty, else whichever is (both are stripped)."""
    return ", ".join(part for part in (caption_prefix.strip(), caption.strip()) if part)


def scan_dataset(folder: str | Path, caption_prefix: str = "", caption_extension: str = ".txt") -> list[DatasetItem]:
    """List the images of a training folder with their captions (see the module docstring).

    Raises ``SaRAError`` naming the path when the folder is missing or holds no images, an image has
    no caption file (the first missing one named, up to 5 more listed), or ``metadata.jsonl`` has a
    line that is not JSON, lacks ``file_name`` or a text, names a missing file, or repeats a file.
    Images are not decoded here: ``validate_images`` does that.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SaRAError(f"training image folder {folder} does not exist")
    if not folder.is_dir():
        raise SaRAError(f"training image folder {folder} is not a folder")
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        items = _read_metadata(folder, metadata)
    else:
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension
        items = _read_caption_files(folder, caption_extension)
    return [DatasetItem(item.image_path, with_prefix(caption_prefix, item.caption)) for item in items]


def _read_caption_files(folder: Path, caption_extension: str) -> list[DatasetItem]:
    images = _top_level_images(folder)
    if not images:
        raise SaRAError(_no_images_message(folder))
    missing = [path for path in images if not path.with_suffix(caption_extension).is_file()]
    if missing:
        first = missing[0]
        message = (
            f"training image {first} has no caption file: expected "
            f"{first.with_suffix(caption_extension)} (or a {METADATA_FILE} in {folder})"
        )
        if len(missing) > 1:
            others = ", ".join(path.name for path in missing[1:6])
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            message += f"; {len(missing) - 1} more images lack one too: {others}{more}"
        raise SaRAError(message)
    return [DatasetItem(path, _read_caption(path.with_suffix(caption_extension))) for path in images]


def _top_level_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not hidden), sorted by name."""
    return sorted(
        (
            path
            for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=lambda path: path.name,
    )


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise SaRAError(f"caption file {path} is not UTF-8 text ({exc})") from None


def _no_images_message(folder: Path) -> str:
    entries = sorted(folder.iterdir(), key=lambda path: path.name)
    if not entries:
        return f"training image folder {folder} is empty"
    names = [path.name + ("/" if path.is_dir() else "") for path in entries]
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return (
        f"no training images ({' '.join(IMAGE_EXTENSIONS)}) in {folder} (subfolders are not "
        f"scanned); it holds {len(names)} other entries: {shown}"
    )


def _read_metadata(folder: Path, metadata: Path) -> list[DatasetItem]:
    items: list[DatasetItem] = []
    seen: set[Path] = set()
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise SaRAError(f"{metadata} is not UTF-8 text ({exc})") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {line_number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SaRAError(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise SaRAError(f'{where} must be a JSON object with a "file_name" string, got {line.strip()[:80]}')
        caption = entry.get("text", entry.get("caption"))
        if not isinstance(caption, str):
            raise SaRAError(f'{where} ({entry["file_name"]}) has no "text" (or "caption") string')
        image_path = folder / entry["file_name"]
        if not image_path.is_file():
            raise SaRAError(f"{where} names {image_path}, which does not exist")
        if image_path in seen:
            raise SaRAError(f"{where} lists {image_path} a second time")
        seen.add(image_path)
        items.append(DatasetItem(image_path, caption.strip()))
    if not items:
        raise SaRAError(f"{metadata} lists no images")
    unlisted = [path.name for path in _top_level_images(folder) if path not in seen]
    if unlisted:
        log.warning(
            "%d images in %s are not listed in %s and are not used: %s",
            len(unlisted),
            folder,
            METADATA_FILE,
            ", ".join(unlisted[:5]) + (", ..." if len(unlisted) > 5 else ""),
        )
    return items


def read_rgb(path: Path) -> Image.Image:
    """Decode an image file fully into RGB: EXIF orientation applied, transparency (RGBA, LA,
    palette transparency) composited on white, grayscale and palette expanded.

    Raises ``SaRAError`` naming the file and PIL's reason when it is not an image or is truncated.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise SaRAError(f"training image {path} cannot be read: {exc}") from None
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def validate_images(items: list[DatasetItem]) -> None:
    """Decode every image once, before any training, so that all bad files are reported together.

    Raises ``SaRAError`` listing each unreadable image with PIL's reason.
    """
    problems = []
    for item in items:
        try:
            read_rgb(item.image_path)
        except SaRAError as exc:
            problems.append(str(exc))
    if problems:
        raise SaRAError(f"{len(problems)} of {len(items)} training images cannot be read:\n  " + "\n  ".join(problems))


def check_image_options(resolution: int, crop: str) -> None:
    """Raise ``SaRAError`` unless ``resolution`` is a positive multiple of 8 and ``crop`` is known."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        raise SaRAError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution!r}")
    if crop not in CROP_MODES:
        raise SaRAError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")


Size = tuple[int, int]
"""(width, height) of a training view in pixels."""
MAX_BUCKET_RATIO = 2.0
"""Aspect-ratio buckets go from 1:2 to 2:1."""


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """The aspect-ratio buckets for ``resolution``: (width, height) pairs with sides multiples of
    ``step``, about ``resolution``² pixels (never more: the height is the largest multiple of ``step``
    with width·height <= resolution²), aspect ratios from 1:2 to 2:1; the square is always one.
    Sorted. ``SaRAError`` unless ``step`` is a positive multiple of 8 dividing ``resolution``."""
    if step < 8 or step % 8 or resolution % step:
        raise SaRAError(
            f"bucket step must be a positive multiple of 8 that divides the resolution {resolution}, got {step}"
        )
    sizes = set()
    for width in range(step, int(resolution * MAX_BUCKET_RATIO) + 1, step):
        height = resolution * resolution // width // step * step
        if height >= step and 1 / MAX_BUCKET_RATIO <= width / height <= MAX_BUCKET_RATIO:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The size among ``sizes`` whose aspect ratio is nearest (in log ratio) to ``width``:``height``;
    of equally near ones the largest."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))


@dataclass(frozen=True)
class ResizePlan:
    """How an image of ``original`` (width, height) becomes views of ``size`` (width, height):
    conceptually it is resized to ``resized`` (just covering ``size``, aspect ratio kept) and the
    view is cut from that. ``cut`` resamples only the view's own region of the original, so the work
    is bounded by the output size, not by the resized image (a 1 x 200,000 pixel image would
    otherwise be upscaled to 64 x 12.8M)."""

    original: Size
    resized: Size
    size: Size

    @classmethod
    def for_image(cls, image: Image.Image, size: Size) -> ResizePlan:
        width, height = image.size
        scale = max(size[0] / width, size[1] / height)
        resized = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
        return cls((width, height), resized, size)

    def source_box(self, top: int, left: int) -> tuple[float, float, float, float]:
        """The region of the original image that becomes the view at ``(top, left)`` of the resized one."""
        scale_x = self.resized[0] / self.original[0]
        scale_y = self.resized[1] / self.original[1]
        return (left / scale_x, top / scale_y, (left + self.size[0]) / scale_x, (top + self.size[1]) / scale_y)


def _crop_position(plan: ResizePlan, crop: CropMode, generator: torch.Generator | None) -> tuple[int, int]:
    (width, height), (view_width, view_height) = plan.resized, plan.size
    if crop == "center":
        return (height - view_height) // 2, (width - view_width) // 2
    top = int(torch.randint(0, height - view_height + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - view_width + 1, (1,), generator=generator))
    return top, left


def _cut(image: Image.Image, plan: ResizePlan, top_left: tuple[int, int], flip: bool) -> LoadedImage:
    top, left = top_left
    width, height = plan.size
    if plan.resized == plan.original:
        view = image.crop((left, top, left + width, top + height))
    else:
        view = image.resize((width, height), Image.Resampling.LANCZOS, box=plan.source_box(top, left))
    pixels = torch.from_numpy(np.asarray(view, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    if flip:
        pixels = pixels.flip(-1)
        left = plan.resized[0] - left - width
    return LoadedImage(pixels.contiguous(), (image.height, image.width), (top, left))


def load_image(
    path: str | Path,
    resolution: int,
    crop: CropMode = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> LoadedImage:
    """One square view of an image: short side resized to ``resolution``, cropped, maybe mirrored.

    ``crop="random"`` draws the corner from ``generator`` (the global torch RNG when None).
    Returns pixels [3, resolution, resolution] in [-1, 1]. Raises ``SaRAError`` for an unreadable
    image or a resolution that is not a positive multiple of 8.
    """
    check_image_options(resolution, crop)
    image = read_rgb(Path(path))
    plan = ResizePlan.for_image(image, (resolution, resolution))
    return _cut(image, plan, _crop_position(plan, crop, generator), flip)


def load_image_variants(
    path: str | Path,
    resolution: int,
    crop: CropMode,
    crop_count: int,
    with_mirror: bool,
    generator: torch.Generator | None = None,
    bucket_step: int = 0,
) -> list[LoadedImage]:
    """Decode an image once and cut ``crop_count`` views from it (``crop_count`` corners drawn from
    ``generator`` in turn for ``"random"``; for ``"center"`` they are all the same). Views are
    ``resolution`` squares, or with ``bucket_step`` the ``bucket_sizes(resolution, bucket_step)``
    size nearest the image's aspect ratio.

    With ``with_mirror`` each view is followed by its left-right mirror:
    ``[crop 0, crop 0 mirrored, crop 1, crop 1 mirrored, ...]``.
    """
    check_image_options(resolution, crop)
    if crop_count < 1:
        raise SaRAError(f"the number of crops per image must be at least 1, got {crop_count}")
    image = read_rgb(Path(path))
    size = nearest_bucket(*image.size, bucket_sizes(resolution, bucket_step)) if bucket_step else (resolution,) * 2
    plan = ResizePlan.for_image(image, size)
    views = []
    for _ in range(crop_count):
        top_left = _crop_position(plan, crop, generator)
        views.append(_cut(image, plan, top_left, flip=False))
        if with_mirror:
            views.append(_cut(image, plan, top_left, flip=True))
    return views
