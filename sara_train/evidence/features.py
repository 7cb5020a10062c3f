"""The style-fit metric: a Fréchet distance between glyph sets in a small classifier's feature space.

The paper measures style fit with FID (Inception features). Here the feature network is a small CNN
trained from scratch, deterministically, on the base model's 12 upright pretraining fonts, randomly
sheared and shifted. It has three heads on one ``FEATURE_WIDTH``-wide feature vector: which
character (62 classes), which pretraining font (12 classes) and how much shear was applied (a
regression). So its features encode character identity, font family and weight, and slant; what
none of its training data varies (e.g. the single-storey italic "a" or a serif's exact shape) it
may not see. It never sees a target font.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..demo.glyphs import CHARACTERS, GLYPH_SIZE, PRETRAINING_FONTS, render_font
from ..engine.errors import SaRAError

FEATURE_WIDTH = 32
MAX_SHEAR = 0.35
"""Largest |horizontal shear| (pixels of shift per pixel of height) of the training augmentation:
about 19 degrees, more than any catalogued italic (12 degrees)."""
MAX_SHIFT = 2.0 / GLYPH_SIZE
"""Largest random shift of the training augmentation, 1 pixel in each direction (in [-1, 1] units)."""


class GlyphFeatureNet(nn.Module):
    """[N, 1, 32, 32] glyphs in [-1, 1] -> features [N, FEATURE_WIDTH] (``features``), plus the three
    training heads (``forward``: character logits [N, 62], font logits [N, 12], shear [N])."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_WIDTH),
        )
        self.character = nn.Linear(FEATURE_WIDTH, len(CHARACTERS))
        self.font = nn.Linear(FEATURE_WIDTH, len(PRETRAINING_FONTS))
        self.shear = nn.Linear(FEATURE_WIDTH, 1)

    def features(self, glyphs: torch.Tensor) -> torch.Tensor:
        return self.trunk(glyphs)

    def forward(self, glyphs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.features(glyphs))
        return self.character(hidden), self.font(hidden), self.shear(hidden).squeeze(1)


def shear_and_shift(glyphs: torch.Tensor, shear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample ``glyphs`` [N, 1, 32, 32] sheared horizontally by ``shear`` [N] (positive leans the
    top to the right) and shifted by ``shift`` [N, 2] (x, y in [-1, 1] units); paper (-1) fills in."""
    theta = torch.zeros(glyphs.shape[0], 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 0, 1] = shear  # sampling x = x' + shear * y': rows above the centre (y < 0) move right
    theta[:, 1, 1] = 1
    theta[:, :, 2] = -shift
    grid = F.affine_grid(theta, list(glyphs.shape), align_corners=False)
    return F.grid_sample(glyphs + 1, grid, align_corners=False, padding_mode="zeros") - 1


@cache
def glyph_feature_net(steps: int = 500, seed: int = 0) -> GlyphFeatureNet:
    """The feature network, trained here (``steps`` Adam steps of 96 augmented pretraining glyphs;
    a few seconds on one CPU core). Same arguments, same torch build: same weights. Cached per
    process; returned in eval mode with gradients off."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = GlyphFeatureNet()
    glyphs = torch.cat([render_font(font) for font in PRETRAINING_FONTS])
    characters = torch.arange(len(CHARACTERS)).repeat(len(PRETRAINING_FONTS))
    fonts = torch.arange(len(PRETRAINING_FONTS)).repeat_interleave(len(CHARACTERS))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    with torch.enable_grad():  # also when first called under no_grad
        for _ in range(steps):
            pick = torch.randint(len(glyphs), (96,), generator=generator)
            shear = (torch.rand(96, generator=generator) * 2 - 1) * MAX_SHEAR
            shift = (torch.rand(96, 2, generator=generator) * 2 - 1) * MAX_SHIFT
            character_logits, font_logits, predicted_shear = net(shear_and_shift(glyphs[pick], shear, shift))
            loss = (
                F.cross_entropy(character_logits, characters[pick])
                + F.cross_entropy(font_logits, fonts[pick])
                + F.mse_loss(predicted_shear, shear / MAX_SHEAR)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def glyph_features(glyphs: torch.Tensor) -> torch.Tensor:
    """Features of ``glyphs`` [N, 1, 32, 32] in [-1, 1]: float64 [N, FEATURE_WIDTH]."""
    if glyphs.ndim != 4 or tuple(glyphs.shape[1:]) != (1, GLYPH_SIZE, GLYPH_SIZE):
        raise SaRAError(f"expected glyphs of shape [N, 1, {GLYPH_SIZE}, {GLYPH_SIZE}], got {tuple(glyphs.shape)}")
    return glyph_feature_net().features(glyphs.float().cpu()).double()


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets [N, D] and [M, D] (N, M >= 2):
    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, in float64. 0 for identical sets; like
    FID it is biased upwards for few samples, so compare values measured with the same N and M."""
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise SaRAError(
            f"need two [N, D] sample sets of the same D, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    if min(first.shape[0], second.shape[0]) < 2:
        raise SaRAError("a Fréchet distance needs at least 2 samples in each set")
    first, second = first.double(), second.double()
    return gaussian_frechet_distance(first.mean(0), torch.cov(first.T), second.mean(0), torch.cov(second.T))


def gaussian_frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mean1, cov1) and N(mean2, cov2); the
    covariances are symmetric positive semi-definite [D, D]."""
    root1 = _psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    value = (mean1 - mean2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return max(0.0, float(value))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
