"""The training set of SaRA Train: ComfyUI latents and conditioning, checked and grouped by shape.

Inputs arrive as lists (the node has ``is_input_list``): one LATENT holding a batch, or several
LATENTs (e.g. from a list-producing loader); one CONDITIONING shared by every image, or one per
image (several CONDITIONINGs, or one CONDITIONING with exactly one entry per image, the
convention of ComfyUI's own Train LoRA node). A dropped caption (caption dropout) trains with the
``dropout_conditioning``: the node's optional input, else the first conditioning zeroed as
ComfyUI's Conditioning Zero Out does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Bucket:
    """Images of one latent shape: ``latents`` [n, C, H, W] (or [n, C, T, H, W]) and, per image,
    the index of its conditioning in ``TrainingSet.conditionings``."""

    latents: torch.Tensor
    conditioning_ids: list[int]


@dataclass
class TrainingSet:
    buckets: list[Bucket]
    conditionings: list[list]
    """Each a ComfyUI CONDITIONING: a list of ``[tensor, dict]`` entries used together."""
    dropout_conditioning: list
    """The CONDITIONING an image trains with when its caption is dropped."""

    @property
    def num_images(self) -> int:
        return sum(len(b.conditioning_ids) for b in self.buckets)


def build_training_set(
    latents: list[dict], conditionings: list[list], dropout_conditioning: list | None = None
) -> TrainingSet:
    """Check the node's inputs and group the images by latent shape.

    Raises ``ValueError`` naming the problem: no images, all-zero latents (an Empty Latent Image
    instead of encoded images), NaN/Inf in latents or conditioning, or a conditioning count that
    is neither 1 nor the number of images.
    """
    images: list[torch.Tensor] = []
    for number, latent in enumerate(latents, start=1):
        samples = latent["samples"] if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
            raise ValueError(f"latent {number} is not a LATENT batch ([batch, channels, height, width])")
        if samples.is_nested:
            raise ValueError(f"latent {number} is a nested (multi-part) latent; SaRA Train takes plain latents")
        if not torch.isfinite(samples).all():
            raise ValueError(f"latent {number} contains NaN or Inf values")
        images.extend(samples.unbind(0))
    if not images:
        raise ValueError("no training images: the latent batch is empty")
    if all(not torch.count_nonzero(image) for image in images):
        raise ValueError(
            "every training latent is all zeros (an Empty Latent Image?): encode your training "
            "images with VAE Encode and connect that LATENT"
        )

    for number, conditioning in enumerate(conditionings, start=1):
        _check_conditioning(conditioning, number)
    if dropout_conditioning is None:
        dropout_conditioning = zeroed(conditionings[0])
    else:
        _check_conditioning(dropout_conditioning, "dropout")
    if len(conditionings) == 1 and len(conditionings[0]) == len(images) > 1:
        conditionings = [[entry] for entry in conditionings[0]]
    if len(conditionings) == 1:
        conditioning_ids = [0] * len(images)
    elif len(conditionings) == len(images):
        conditioning_ids = list(range(len(images)))
    else:
        raise ValueError(
            f"got {len(conditionings)} conditionings for {len(images)} training images: give one "
            "shared conditioning or exactly one per image"
        )

    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    buckets = [
        Bucket(torch.stack([images[i] for i in indices]).float(), [conditioning_ids[i] for i in indices])
        for indices in by_shape.values()
    ]
    return TrainingSet(buckets, conditionings, dropout_conditioning)


def zeroed(conditioning: list) -> list:
    """``conditioning`` with its embeddings and pooled output set to zeros (Conditioning Zero Out)."""
    entries = []
    for tensor, extras in conditioning:
        extras = dict(extras)
        if isinstance(extras.get("pooled_output"), torch.Tensor):
            extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        entries.append([torch.zeros_like(tensor), extras])
    return entries


def _check_conditioning(conditioning, number: int | str) -> None:
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"conditioning {number} is empty or not a CONDITIONING")
    for entry in conditioning:
        tensors = [entry[0]] + [v for v in entry[1].values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"conditioning {number} contains NaN or Inf values")
