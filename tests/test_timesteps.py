"""Timestep sampling and min-SNR-γ weighting against diffusers' training utilities as the reference."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from sara_train.engine.errors import SaRAError
from sara_train.trainer.timesteps import TIMESTEP_SAMPLINGS, draw_fractions, min_snr_weights, snr_weights


@pytest.mark.parametrize("sampling", TIMESTEP_SAMPLINGS)
def test_draws_equal_diffusers_density_sampling(sampling: str) -> None:
    ours = draw_fractions(sampling, 4096, torch.Generator().manual_seed(5), 0.3, 0.8, 1.1)
    reference = compute_density_for_timestep_sampling(
        sampling, 4096, 0.3, 0.8, 1.1, generator=torch.Generator().manual_seed(5)
    ).clamp(0, 1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert ours.dtype == torch.float32 and ours.min() >= 0 and ours.max() <= 1


def test_logit_normal_concentrates_on_the_middle_and_mode_scale_skews() -> None:
    uniform = draw_fractions("uniform", 20_000, torch.Generator().manual_seed(0))
    logit = draw_fractions("logit_normal", 20_000, torch.Generator().manual_seed(0))
    middle = lambda u: float(((u > 0.25) & (u < 0.75)).float().mean())
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert middle(logit) == pytest.approx(0.7, abs=0.03)  # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728
    low = draw_fractions("mode", 20_000, torch.Generator().manual_seed(0), mode_scale=1.29)
    assert middle(low) > middle(uniform)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_paper(prediction_type: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 200, 999])
    snr = compute_snr(scheduler, timesteps).double()
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(weights, expected.float(), rtol=1e-5, atol=0)
    assert snr[0] > 5 > snr[-1]  # the clip acts at t=0 and not at t=999


def test_bad_gamma_sampling_and_prediction_are_refused() -> None:
    with pytest.raises(SaRAError, match="gamma must be > 0"):
        snr_weights(torch.ones(2), 0.0, "epsilon")
    with pytest.raises(SaRAError, match="not 'flow'"):
        snr_weights(torch.ones(2), 5.0, "flow")
    with pytest.raises(SaRAError, match="one of uniform, logit_normal, mode"):
        draw_fractions("cosine", 2, torch.Generator())
    with pytest.raises(SaRAError, match="standard deviation > 0"):
        draw_fractions("logit_normal", 2, torch.Generator(), logit_std=0.0)
