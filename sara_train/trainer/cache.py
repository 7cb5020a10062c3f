"""Encode the training images and captions once, and keep the results on disk between runs.

``build_examples`` turns ``DatasetItem``s into ``TrainingExample``s: each image yields one or more
views (squares, or with ``bucket_step`` the aspect-ratio bucket nearest the image's; see below),
each view is encoded by ``encode_images`` (the VAE), each distinct caption by ``encode_prompts``
(the text encoders), all under ``torch.no_grad``.

Views of one image, in this order:

* ``crop="center"``: one view.
* ``crop="random"``: ``random_crop_variants`` crops, their corners drawn once from a
  ``torch.Generator`` seeded from ``seed`` and the image's content hash. Random cropping is thus a
  fixed set of crops per image (so their latents can be cached); the trainer samples among them.
* ``flip=True``: each view is followed by its left-right mirror (twice the views).

Cache: with a ``cache_dir``, every image has one file ``<key>.safetensors`` holding
``latents`` [V, C, h, w], ``time_ids`` [V, 6] float32, ``hidden_states`` [L, D] and, when the text
encoder has one, ``pooled`` [P]. ``key`` is the sha256 of the image file's bytes, the caption, the
resolution, crop mode, flip, bucket step, crop count and seed (random crop), the caller's ``model_fingerprint``
(naming the VAE and text encoders) and the cache format version. Unchanged images are read back
bit-identical; a change to any of these re-encodes only the images it touches. Files no longer
used are left in place and may be deleted at any time. A cache file that cannot be read
(truncated, not safetensors, wrong contents) is re-encoded with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..engine.errors import SaRAError
from ..engine.files import atomic_output, read_safetensors_header
from .data import CropMode, DatasetItem, LoadedImage, check_image_options, load_image_variants, validate_images
from .types import PromptEmbedding, TrainingExample

CACHE_FORMAT = "sara-train-cache-2"
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
PromptEncoder = Callable[[list[str]], list[PromptEmbedding]]

log = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    """Everything cached for one image: ``latents`` [V, C, h, w], ``time_ids`` [V, 6] (original h, w,
    crop top, left, resolution, resolution per view) and its caption's ``prompt``."""

    latents: torch.Tensor
    time_ids: torch.Tensor
    prompt: PromptEmbedding


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes. Raises ``SaRAError`` naming the file if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise SaRAError(f"training image {path} cannot be read: {exc}") from None
    return digest.hexdigest()


def data_fingerprint(items: Sequence[DatasetItem], image_hashes: Sequence[str]) -> str:
    """16 hex digits identifying a training set: every image's bytes (``file_sha256``) and caption,
    in order. File names and folder spellings do not enter it."""
    digest = hashlib.sha256()
    for item, image_hash in zip(items, image_hashes, strict=True):
        digest.update(json.dumps([image_hash, item.caption]).encode())
    return digest.hexdigest()[:16]


def build_examples(
    items: Sequence[DatasetItem],
    *,
    resolution: int,
    crop: CropMode,
    flip: bool,
    random_crop_variants: int,
    encode_images: ImageEncoder,
    encode_prompts: PromptEncoder,
    model_fingerprint: str,
    cache_dir: Path | None,
    batch_size: int = 4,
    seed: int = 0,
    with_time_ids: bool = False,
    progress: bool = True,
    image_hashes: Sequence[str] | None = None,
    bucket_step: int = 0,
) -> list[TrainingExample]:
    """Encode (or read from ``cache_dir``) every view of every image; see the module docstring.

    ``encode_images`` gets float32 CPU pixels [B, 3, H, W] in [-1, 1] (B <= ``batch_size``) and
    returns latents [B, C, h, w] as the UNet takes them (VAE scaling already applied).
    ``encode_prompts`` gets up to ``batch_size`` captions and returns one ``PromptEmbedding`` each.
    Results are moved to the CPU. ``cache_dir=None`` keeps everything in memory only.
    ``image_hashes`` (``file_sha256`` of each item's image) saves hashing the files again.
    ``bucket_step`` > 0: each image's views take the size of its aspect-ratio bucket
    (``data.bucket_sizes``) instead of the ``resolution`` square; latents then differ in size
    between images.

    Returns the examples in item order, views in the order above; ``time_ids`` is set only with
    ``with_time_ids`` (SDXL). Before encoding anything, every image that is not cached is decoded
    once: ``SaRAError`` lists all unreadable ones. Also raises ``SaRAError`` for bad options or an
    encoder returning the wrong number or shape of results.
    """
    check_image_options(resolution, crop)
    if crop == "random" and random_crop_variants < 1:
        raise SaRAError(f"random_crop_variants must be at least 1 with random crop, got {random_crop_variants}")
    if batch_size < 1:
        raise SaRAError(f"batch_size must be at least 1, got {batch_size}")
    if not items:
        raise SaRAError("no training images were given")
    crop_count = random_crop_variants if crop == "random" else 1
    view_count = crop_count * (2 if flip else 1)
    if image_hashes is None:
        image_hashes = [file_sha256(item.image_path) for item in items]
    view_options = {"resolution": resolution, "crop": crop, "flip": flip}
    if crop == "random":
        view_options |= {"crops": crop_count, "seed": seed}
    if bucket_step:
        view_options |= {"bucket_step": bucket_step}
    cache_paths = [
        cache_dir / f"{_cache_key(image_hash, item.caption, view_options, model_fingerprint)}.safetensors"
        if cache_dir is not None
        else None
        for item, image_hash in zip(items, image_hashes)
    ]

    encoded: dict[int, EncodedImage] = {}
    for index, path in enumerate(cache_paths):
        entry = _read_entry(path, view_count) if path is not None else None
        if entry is not None:
            encoded[index] = entry
    missing = [index for index in range(len(items)) if index not in encoded]
    if cache_dir is not None:
        log.info("%d of %d training images read from the cache in %s", len(encoded), len(items), cache_dir)
    validate_images([items[index] for index in missing])

    prompts = {items[index].caption: entry.prompt for index, entry in encoded.items()}
    new_captions = list(
        dict.fromkeys(caption for caption in (items[index].caption for index in missing) if caption not in prompts)
    )
    prompts |= _encode_captions(new_captions, encode_prompts, batch_size)

    def store(index: int, views: list[LoadedImage], latents: torch.Tensor) -> None:
        time_ids = torch.tensor(
            [[*view.original_size, *view.crop_top_left, *view.pixels.shape[-2:]] for view in views],
            dtype=torch.float32,
        )
        entry = EncodedImage(latents, time_ids, prompts[items[index].caption])
        if cache_paths[index] is not None:
            _write_entry(cache_paths[index], entry, items[index])
        encoded[index] = entry

    views_of = (
        (
            index,
            load_image_variants(
                items[index].image_path,
                resolution,
                crop,
                crop_count,
                flip,
                _crop_generator(seed, image_hashes[index]),
                bucket_step,
            ),
        )
        for index in missing
    )
    _encode_views(views_of, len(missing), encode_images, batch_size, progress, store)

    return [
        TrainingExample(latents, prompts[items[index].caption], time_ids if with_time_ids else None)
        for index in range(len(items))
        for latents, time_ids in zip(encoded[index].latents, encoded[index].time_ids)
    ]


def _crop_generator(seed: int, image_hash: str) -> torch.Generator:
    """The generator an image's random crops are drawn from: fixed by ``seed`` and its content."""
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{image_hash}".encode()).hexdigest()[:15], 16))


def _cache_key(image_hash: str, caption: str, view_options: dict, model_fingerprint: str) -> str:
    fields = {
        "format": CACHE_FORMAT,
        "image_sha256": image_hash,
        "caption": caption,
        "views": view_options,
        "model": model_fingerprint,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _encode_captions(
    captions: list[str], encode_prompts: PromptEncoder, batch_size: int
) -> dict[str, PromptEmbedding]:
    """Encode each caption once, ``batch_size`` at a time; results on the CPU."""
    prompts: dict[str, PromptEmbedding] = {}
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        with torch.no_grad():
            embeddings = list(encode_prompts(batch))
        if len(embeddings) != len(batch):
            raise SaRAError(f"encode_prompts returned {len(embeddings)} embeddings for {len(batch)} captions")
        for caption, embedding in zip(batch, embeddings):
            if embedding.hidden_states.ndim != 2:
                raise SaRAError(
                    f"encode_prompts returned hidden_states of shape "
                    f"{tuple(embedding.hidden_states.shape)} for {caption!r}; expected [tokens, width]"
                )
            pooled = embedding.pooled.detach().cpu().contiguous() if embedding.pooled is not None else None
            prompts[caption] = PromptEmbedding(embedding.hidden_states.detach().cpu().contiguous(), pooled)
    return prompts


def _encode_views(
    views_of: Iterable[tuple[int, list[LoadedImage]]],
    image_count: int,
    encode_images: ImageEncoder,
    batch_size: int,
    progress: bool,
    store: Callable[[int, list[LoadedImage], torch.Tensor], None],
) -> None:
    """Encode the views of ``image_count`` images, given as ``(index, views)`` pairs, in batches of
    up to ``batch_size`` views of one size (a batch may span images); ``store(index, views, latents [V, C, h, w])`` is
    called for each image as soon as all its views are encoded."""
    pending: dict[int, tuple[list[LoadedImage], list[torch.Tensor]]] = {}
    batch: list[tuple[int, torch.Tensor]] = []
    show = progress and image_count > 0
    with tqdm(total=image_count, desc="caching latents", unit="image", disable=not show) as bar:

        def flush() -> None:
            with torch.no_grad():
                latents = encode_images(torch.stack([pixels for _, pixels in batch]))
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != len(batch):
                shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise SaRAError(
                    f"encode_images returned {shape} for a batch of {len(batch)} images; "
                    f"expected [{len(batch)}, channels, height, width]"
                )
            for (index, _), latent in zip(batch, latents.detach().cpu()):
                pending[index][1].append(latent)
            batch.clear()
            for index in [index for index, (views, done) in pending.items() if len(done) == len(views)]:
                views, done = pending.pop(index)
                store(index, views, torch.stack(done))
                bar.update(1)

        for index, views in views_of:
            pending[index] = (views, [])
            for view in views:
                if batch and batch[0][1].shape != view.pixels.shape:  # a batch holds one view size
                    flush()
                batch.append((index, view.pixels))
                if len(batch) == batch_size:
                    flush()
        if batch:
            flush()


def _read_entry(path: Path, view_count: int) -> EncodedImage | None:
    """The cached entry at ``path``, or None when there is none or it cannot be used (warned)."""
    if not path.is_file():
        return None
    try:
        read_safetensors_header(path)
        tensors = load_file(str(path))
        absent = [name for name in ("latents", "time_ids", "hidden_states") if name not in tensors]
        if absent:
            raise SaRAError(f"it has no {', '.join(absent)}")
        latents, time_ids, hidden_states = tensors["latents"], tensors["time_ids"], tensors["hidden_states"]
        if (
            latents.ndim != 4
            or latents.shape[0] != view_count
            or tuple(time_ids.shape) != (view_count, 6)
            or hidden_states.ndim != 2
        ):
            raise SaRAError(
                f"latents {tuple(latents.shape)}, time_ids {tuple(time_ids.shape)} and hidden_states "
                f"{tuple(hidden_states.shape)} do not fit {view_count} views"
            )
    except (SaRAError, SafetensorError, OSError) as exc:
        log.warning("cache file %s cannot be used (%s); encoding its image again", path, exc)
        return None
    return EncodedImage(latents, time_ids, PromptEmbedding(hidden_states, tensors.get("pooled")))


def _write_entry(path: Path, entry: EncodedImage, item: DatasetItem) -> None:
    tensors = {"latents": entry.latents, "time_ids": entry.time_ids, "hidden_states": entry.prompt.hidden_states}
    if entry.prompt.pooled is not None:
        tensors["pooled"] = entry.prompt.pooled
    metadata = {"format": CACHE_FORMAT, "image": str(item.image_path), "caption": item.caption}
    with atomic_output(path) as temp:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temp), metadata=metadata)
