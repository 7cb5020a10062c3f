"""The validation loss: the denoising error on held-out examples at fixed timesteps and noise.

Every example is scored at ``TIMESTEPS_PER_EXAMPLE`` timesteps spread evenly over the schedule,
each with its own noise drawn once from a generator seeded with the run's seed, so the value depends
only on the model: the same weights give the same number at every step and after a resume. It is
the plain mean squared error (no min-SNR weighting), so runs with different weightings compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .objective import example_errors
from .types import TrainingExample

TIMESTEPS_PER_EXAMPLE = 4
BATCH = 8
"""Examples per UNet call while validating."""


@dataclass
class ValidationSet:
    """Held-out ``examples`` [N], each repeated ``TIMESTEPS_PER_EXAMPLE`` times with fixed ``noise``
    [N*T, C, H, W] (CPU) and ``timesteps`` [N*T] (example-major order)."""

    examples: list[TrainingExample]
    noise: torch.Tensor
    timesteps: torch.Tensor


def validation_set(examples: Sequence[TrainingExample], num_train_timesteps: int, seed: int) -> ValidationSet:
    """Fix the noise and timesteps of ``examples`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    repeated = [example for example in examples for _ in range(TIMESTEPS_PER_EXAMPLE)]
    noise = torch.randn(len(repeated), *examples[0].latents.shape, generator=generator)
    spread = ((torch.arange(TIMESTEPS_PER_EXAMPLE) + 0.5) * num_train_timesteps / TIMESTEPS_PER_EXAMPLE).long()
    return ValidationSet(repeated, noise, spread.repeat(len(examples)))


@torch.no_grad()
def validation_loss(
    unet: nn.Module, noise_scheduler, validation: ValidationSet, compute_dtype: torch.dtype, device: torch.device
) -> float:
    """Mean denoising error over ``validation`` with ``unet`` in eval mode (its mode is restored)."""
    was_training = unet.training
    unet.eval()
    try:
        total = 0.0
        for start in range(0, len(validation.examples), BATCH):
            part = slice(start, start + BATCH)
            errors = example_errors(
                unet,
                noise_scheduler,
                validation.examples[part],
                validation.noise[part],
                validation.timesteps[part],
                compute_dtype,
                device,
            )
            total += float(errors.double().sum())
    finally:
        unet.train(was_training)
    return total / len(validation.examples)
