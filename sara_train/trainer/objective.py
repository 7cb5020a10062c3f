"""The denoising objective of the Stable Diffusion trainer: what the UNet should predict, and each
example's squared error."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.errors import SaRAError
from .types import TrainingExample


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict for ``prediction_type`` (epsilon, v_prediction or sample)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise SaRAError(f"unsupported scheduler prediction_type {prediction_type!r}")


def example_errors(
    unet: nn.Module,
    noise_scheduler,
    batch: Sequence[TrainingExample],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Each example's denoising mean squared error (fp32 [B] on ``device``) for the given ``noise``
    [B, C, H, W] and ``timesteps`` [B]: the examples' latents are noised (``add_noise``) and the UNet's
    prediction is compared with the scheduler's target."""
    latents = torch.stack([example.latents for example in batch]).float().to(device)
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    hidden_states = torch.stack([example.prompt.hidden_states for example in batch]).to(device, compute_dtype)
    added_conditions = None
    if batch[0].prompt.pooled is not None:
        added_conditions = {
            "text_embeds": torch.stack([example.prompt.pooled for example in batch]).to(device, compute_dtype),
            "time_ids": torch.stack([example.time_ids for example in batch]).to(device, compute_dtype),
        }
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        prediction = unet(
            noisy.to(compute_dtype), timesteps, encoder_hidden_states=hidden_states, added_cond_kwargs=added_conditions
        ).sample
    return nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
