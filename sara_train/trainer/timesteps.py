"""Timestep sampling and loss weighting, shared by the CLI objectives and the SaRA Train node.

Plain torch (no diffusers import), so the ComfyUI nodes use it in a ComfyUI-Manager install.

* Sampling (the SD3 paper, Esser et al. 2024, section 3.1): a draw u in [0, 1] per example,
  ``uniform``; ``logit_normal``: sigmoid of N(m, s); ``mode``: u' = 1 - u - scale·(cos²(πu/2) - 1 + u)
  for a uniform u. Each consumes the generator exactly as diffusers'
  ``compute_density_for_timestep_sampling`` does, so the two give the same draws.
* Weighting: min-SNR-γ (Hang et al., ICCV 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy") clips each example's signal-to-noise ratio at γ and weights its loss so that easy,
  low-noise timesteps stop dominating: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for
  v-prediction, min(SNR, γ) for x₀-prediction.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..engine.errors import SaRAError

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "mode")
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def draw_fractions(
    sampling: TimestepSampling,
    count: int,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """``count`` draws u in [0, 1] (float32 [count], CPU) from ``generator`` by ``sampling``."""
    if sampling == "logit_normal":
        if not logit_std > 0:
            raise SaRAError(f"logit-normal sampling needs a standard deviation > 0, got {logit_std}")
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (count,), generator=generator))
    elif sampling == "mode":
        uniform = torch.rand(count, generator=generator)
        u = 1 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    elif sampling == "uniform":
        u = torch.rand(count, generator=generator)
    else:
        raise SaRAError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
    return u.clamp(0.0, 1.0)


def snr_weights(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-γ weight per example from its signal-to-noise ratio ``snr`` [B] (> 0): float32 [B]."""
    if not gamma > 0:
        raise SaRAError(f"min-SNR gamma must be > 0, got {gamma}")
    snr = snr.float()
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise SaRAError(f"min-SNR weighting is defined for epsilon, v_prediction or sample, not {prediction_type!r}")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight of each of ``timesteps`` [B] under ``noise_scheduler`` (a DDPM-style
    scheduler with ``alphas_cumprod`` and a ``prediction_type``), where SNR(t) = ᾱ_t / (1 - ᾱ_t):
    float32 [B] on ``timesteps``' device."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    return snr_weights(alphas / (1 - alphas), gamma, noise_scheduler.config.prediction_type)
