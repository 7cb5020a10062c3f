"""Per-example loss weights over timesteps.

Min-SNR-γ (Hang et al., ICCV 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")
clips each timestep's signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) at γ and weights the loss of
each example so that easy, low-noise timesteps stop dominating: for ε-prediction
min(SNR, γ) / SNR, for v-prediction min(SNR, γ) / (SNR + 1), for x₀-prediction min(SNR, γ).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from ..engine.errors import SaRAError


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight of each of ``timesteps`` [B] under ``noise_scheduler`` (a DDPM-style
    scheduler with ``alphas_cumprod`` and a ``prediction_type``): float32 [B] on ``timesteps``'
    device. ``gamma`` > 0."""
    if not gamma > 0:
        raise SaRAError(f"min-SNR gamma must be > 0, got {gamma}")
    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = snr.clamp(max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise SaRAError(f"min-SNR weighting is defined for epsilon, v_prediction or sample, not {prediction_type!r}")
