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

from .objective import Objective
from .types import TrainingExample

TIMESTEPS_PER_EXAMPLE = 4
BATCH = 8
"""Examples per UNet call while validating."""


@dataclass
class ValidationSet:
    """Held-out ``examples`` [N], each repeated ``TIMESTEPS_PER_EXAMPLE`` times with fixed ``noise``
    (N*T tensors shaped like their example's latents, CPU) and ``timesteps`` [N*T] (example-major)."""

    examples: list[TrainingExample]
    noise: list[torch.Tensor]
    timesteps: torch.Tensor


def validation_set(examples: Sequence[TrainingExample], objective: Objective, seed: int) -> ValidationSet:
    """Fix the noise (drawn item by item) and ``objective``'s timesteps of ``examples`` (see the
    module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    repeated = [example for example in examples for _ in range(TIMESTEPS_PER_EXAMPLE)]
    noise = [torch.randn(example.latents.shape, generator=generator) for example in repeated]
    spread = objective.spread_timesteps(TIMESTEPS_PER_EXAMPLE)
    return ValidationSet(repeated, noise, spread.repeat(len(examples)))


@torch.no_grad()
def validation_loss(
    model: nn.Module, objective: Objective, validation: ValidationSet, compute_dtype: torch.dtype, device: torch.device
) -> float:
    """Mean denoising error of ``model`` over ``validation`` in eval mode (its mode is restored);
    consecutive items of one latent size are scored together, up to ``BATCH`` at a time."""
    was_training = model.training
    model.eval()
    try:
        total, start = 0.0, 0
        while start < len(validation.examples):
            shape = validation.noise[start].shape
            stop = start + 1
            while stop < min(start + BATCH, len(validation.examples)) and validation.noise[stop].shape == shape:
                stop += 1
            errors = objective.example_errors(
                model,
                validation.examples[start:stop],
                torch.stack(validation.noise[start:stop]),
                validation.timesteps[start:stop],
                compute_dtype,
                device,
            )
            total += float(errors.double().sum())
            start = stop
    finally:
        model.train(was_training)
    return total / len(validation.examples)
