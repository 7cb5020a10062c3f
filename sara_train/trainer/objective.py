"""The training objectives: how a family's denoiser learns from an example at a timestep.

An ``Objective`` draws the timesteps of a micro-batch, fixes evenly spread ones for the validation
loss, computes each example's squared error against its target, and optionally weights examples:

* ``DenoisingObjective``: DDPM noising for Stable Diffusion 1.x/2.x/XL UNets (the scheduler's
  ``prediction_type``: ε, v or x₀), integer timesteps drawn uniformly, min-SNR-γ weighting.
* ``FlowMatchingObjective``: rectified flow for SD3/3.5 and Flux.1 transformers. A draw u in [0, 1)
  (uniform, logit-normal or SD3's mode sampling) becomes the noise level σ = s·u / (1 + (s - 1)·u)
  with the pipeline's shift s (SD3's fixed ``shift``; Flux's resolution-dependent ``exp(mu)``);
  x_σ = (1 - σ)·x₀ + σ·ε and the transformer predicts the velocity ε - x₀.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from einops import rearrange
from torch import nn

from ..engine.errors import SaRAError
from .timesteps import TIMESTEP_SAMPLINGS, TimestepSampling, draw_fractions, min_snr_weights
from .types import TrainingExample


class Objective(ABC):
    """What ``run_training`` needs to turn examples into a loss (see the module docstring)."""

    @abstractmethod
    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` training timesteps [count] (CPU), drawn from ``generator``."""

    @abstractmethod
    def spread_timesteps(self, count: int) -> torch.Tensor:
        """``count`` timesteps [count] spread evenly over the schedule (for the validation loss)."""

    @abstractmethod
    def example_errors(
        self,
        model: nn.Module,
        batch: Sequence[TrainingExample],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        compute_dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """Each example's mean squared error (fp32 [B] on ``device``) for ``noise`` [B, C, H, W]
        (shaped like the examples' latents) and ``timesteps`` [B] from this objective."""

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-example loss weights [B] for ``timesteps`` [B] (on their device), or None (all 1)."""
        return None


def stacked_latents(batch: Sequence[TrainingExample], device: torch.device) -> torch.Tensor:
    return torch.stack([example.latents for example in batch]).float().to(device)


def stacked_prompts(
    batch: Sequence[TrainingExample], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's text states [B, L, D] and pooled embeddings [B, P] (None when the family has none)."""
    states = torch.stack([example.prompt.hidden_states for example in batch]).to(device, dtype)
    if batch[0].prompt.pooled is None:
        return states, None
    return states, torch.stack([example.prompt.pooled for example in batch]).to(device, dtype)


def squared_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error [B], in fp32."""
    return nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a UNet should predict for ``prediction_type`` (epsilon, v_prediction or sample)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise SaRAError(f"unsupported scheduler prediction_type {prediction_type!r}")


class DenoisingObjective(Objective):
    """DDPM noising for ``UNet2DConditionModel``s. ``noise_scheduler``: a ``DDPMScheduler`` (its
    betas, ``num_train_timesteps`` and ``prediction_type``). ``snr_gamma`` > 0 weights each example
    by min-SNR-γ (``timesteps.min_snr_weights``)."""

    def __init__(self, noise_scheduler, snr_gamma: float = 0.0) -> None:
        self.noise_scheduler, self.snr_gamma = noise_scheduler, snr_gamma

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator)

    def spread_timesteps(self, count: int) -> torch.Tensor:
        return ((torch.arange(count) + 0.5) * self.num_train_timesteps / count).long()

    def example_errors(self, model, batch, noise, timesteps, compute_dtype, device) -> torch.Tensor:
        """The examples' latents noised (``add_noise``); the UNet's prediction against the
        scheduler's target. SDXL examples add their pooled embedding and ``time_ids``."""
        latents = stacked_latents(batch, device)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        states, pooled = stacked_prompts(batch, device, compute_dtype)
        added_conditions = None
        if pooled is not None:
            time_ids = torch.stack([example.time_ids for example in batch]).to(device, compute_dtype)
            added_conditions = {"text_embeds": pooled, "time_ids": time_ids}
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            prediction = model(
                noisy.to(compute_dtype), timesteps, encoder_hidden_states=states, added_cond_kwargs=added_conditions
            ).sample
        return squared_errors(prediction, target)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if not self.snr_gamma:
            return None
        return min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)


class FlowMatchingObjective(Objective):
    """Rectified flow for ``SD3Transformer2DModel`` (``family`` "sd3") and ``FluxTransformer2DModel``
    ("flux").

    ``scheduler_config``: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config, whose
    ``num_train_timesteps`` scale SD3's timestep input and whose ``shift`` (or, with
    ``use_dynamic_shifting``, ``base_shift``/``max_shift`` over ``base_image_seq_len``/
    ``max_image_seq_len`` tokens) is the shift s unless ``shift`` overrides it. ``sampling`` draws u:
    ``uniform``, ``logit_normal`` (sigmoid of N(``logit_mean``, ``logit_std``)) or ``mode``
    (``mode_scale``), as in the SD3 paper (``timesteps.draw_fractions``).
    ``guidance``: the value of Flux's distilled-guidance input for models that have one.
    Timesteps handed around are the draws u; σ is formed per batch (``sigmas``).
    """

    def __init__(
        self,
        family: Literal["sd3", "flux"],
        scheduler_config: dict[str, Any],
        sampling: TimestepSampling = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float | None = None,
        guidance: float = 1.0,
    ) -> None:
        if family not in ("sd3", "flux"):
            raise SaRAError(f"flow matching is for the sd3 and flux families, not {family!r}")
        if sampling not in TIMESTEP_SAMPLINGS:
            raise SaRAError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
        self.family, self.scheduler_config, self.sampling = family, dict(scheduler_config), sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift, self.guidance = shift, guidance

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return draw_fractions(self.sampling, count, generator, self.logit_mean, self.logit_std, self.mode_scale)

    def spread_timesteps(self, count: int) -> torch.Tensor:
        return (torch.arange(count, dtype=torch.float32) + 0.5) / count

    def shift_for(self, height: int, width: int) -> float:
        """The shift s for latents of ``height`` x ``width``: ``shift`` if given, else the
        pipeline's (Flux's dynamic shift counts one image token per 2x2 latent patch)."""
        if self.shift is not None:
            return self.shift
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)

    def sigmas(self, timesteps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Noise levels σ [B] of draws u = ``timesteps`` [B] for latents of ``height`` x ``width``."""
        shift = self.shift_for(height, width)
        u = timesteps.float()
        return shift * u / (1 + (shift - 1) * u)

    def example_errors(self, model, batch, noise, timesteps, compute_dtype, device) -> torch.Tensor:
        latents = stacked_latents(batch, device)
        noise = noise.to(device)
        sigma = self.sigmas(timesteps, *latents.shape[-2:]).to(device).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        target = noise - latents
        states, pooled = stacked_prompts(batch, device, compute_dtype)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            if self.family == "sd3":
                prediction = model(
                    hidden_states=noisy.to(compute_dtype),
                    timestep=(sigma.flatten() * self.scheduler_config["num_train_timesteps"]).to(compute_dtype),
                    encoder_hidden_states=states,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
            else:
                prediction = self.flux_prediction(model, noisy, sigma.flatten(), states, pooled, compute_dtype)
        return squared_errors(prediction, target)

    def flux_prediction(
        self,
        model: nn.Module,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        states: torch.Tensor,
        pooled: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Flux's velocity for ``noisy`` [B, C, H, W]: latents packed into 2x2-patch tokens with their
        (0, row, column) ids, text ids all zero, the guidance input when the model has one; unpacked."""
        height, width = noisy.shape[-2:]
        if height % 2 or width % 2:
            raise SaRAError(f"Flux packs 2x2 latent patches: latents of {height}x{width} need even sides")
        batch, device = noisy.shape[0], noisy.device
        tokens = rearrange(noisy, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(device)
        text_ids = torch.zeros(states.shape[1], 3, device=device)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        predicted = model(
            hidden_states=tokens.to(compute_dtype),
            timestep=sigma.to(compute_dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return rearrange(predicted, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)


def as_objective(objective: Objective | Any, snr_gamma: float = 0.0) -> Objective:
    """``objective`` itself, or for a DDPM-style noise scheduler its ``DenoisingObjective`` with
    min-SNR-``snr_gamma``. ``SaRAError`` for ``snr_gamma`` with a flow-matching objective."""
    if isinstance(objective, FlowMatchingObjective) and snr_gamma:
        raise SaRAError(
            "--snr-gamma weights ε/v-prediction losses (Stable Diffusion 1.x/2.x/XL); flow-matching models "
            "(SD3, Flux) choose timesteps with --timestep-sampling instead"
        )
    if isinstance(objective, Objective):
        return objective
    return DenoisingObjective(objective, snr_gamma)
