"""The data types the trainer's pieces hand to each other: encoded prompts and cached examples."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbedding:
    """One prompt as the UNet consumes it.

    ``hidden_states``: [L, D] text-encoder states the UNet cross-attends to.
    ``pooled``: [P] pooled text embedding (SDXL's ``text_embeds``), or None for SD1.x/SD2.x.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class TrainingExample:
    """One training item in the UNet's input space, ready for noising.

    ``latents``: [C, H, W] (VAE latents for Stable Diffusion; pixels in [-1, 1] for the glyph demo).
    ``prompt``: its caption, encoded.
    ``time_ids``: [6] SDXL micro-conditioning (original h, w, crop top, left, target h, w), else None.
    """

    latents: torch.Tensor
    prompt: PromptEmbedding
    time_ids: torch.Tensor | None = None
