"""Automatic checks of generated glyphs: is it the right character, which font's style is it
closest to, and how slanted is it.

Both compare glyphs after a small Gaussian blur (sigma 1 pixel), so a stroke one pixel off costs
little. As a reference point, classifying each catalogued font's rendering by its nearest glyph in
the *other* fonts is right for 0.9-1.0 of the characters of most fonts, but only ~0.6-0.7 for the
typewriter and italic fonts (their capitals are small or slanted); generated glyphs are compared
against all catalogued fonts, their own font included.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..engine.errors import SaRAError
from .glyphs import ALL_FONTS, CHARACTERS, GLYPH_SIZE, Font, character_index, render_font, render_glyphs

BLUR_SIGMA = 1.0


def _blurred(glyphs: torch.Tensor) -> torch.Tensor:
    """[N, 1, 32, 32] -> [N, 1024]: Gaussian-blurred (sigma ``BLUR_SIGMA``), flattened, float32."""
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
    kernel = kernel / kernel.sum()
    x = glyphs.detach().float().cpu()
    x = F.conv2d(x, kernel.view(1, 1, 1, 7), padding=(0, 3))
    x = F.conv2d(x, kernel.view(1, 1, 7, 1), padding=(3, 0))
    return x.flatten(1)


@lru_cache(maxsize=1)
def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``CHARACTERS`` glyph of every catalogued font, blurred: ([F*62, 1024], labels [F*62])."""
    glyphs = torch.cat([render_font(font) for font in ALL_FONTS])
    labels = torch.arange(len(CHARACTERS)).repeat(len(ALL_FONTS))
    return _blurred(glyphs), labels


def _check_glyphs(generated: torch.Tensor, chars: Sequence[str] | None = None) -> None:
    """``SaRAError`` unless ``generated`` is [N, 1, 32, 32] with N = len(chars), chars all known."""
    if generated.ndim != 4 or tuple(generated.shape[1:]) != (1, GLYPH_SIZE, GLYPH_SIZE):
        raise SaRAError(f"expected glyphs of shape [N, 1, {GLYPH_SIZE}, {GLYPH_SIZE}], got {tuple(generated.shape)}")
    if chars is not None:
        if generated.shape[0] != len(chars):
            raise SaRAError(f"{generated.shape[0]} glyphs but {len(chars)} characters")
        for char in chars:
            character_index(char)


def recognise_characters(generated: torch.Tensor) -> list[str]:
    """The character of each glyph in ``generated`` [N, 1, 32, 32] (in [-1, 1]): that of its nearest
    rendered glyph (L2 after blurring) over all catalogued fonts."""
    _check_glyphs(generated)
    reference, labels = _reference()
    nearest = torch.cdist(_blurred(generated), reference).argmin(dim=1)
    return [CHARACTERS[int(labels[index])] for index in nearest]


def character_accuracy(generated: torch.Tensor, chars: Sequence[str]) -> float:
    """Fraction of ``generated`` [N, 1, 32, 32] glyphs recognised as the intended ``chars`` [N]."""
    _check_glyphs(generated, chars)
    recognised = recognise_characters(generated)
    return sum(got == want for got, want in zip(recognised, chars)) / len(chars)


def glyph_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Root-mean-square pixel distance (blurred, on the [-1, 1] scale) between two glyph batches
    [N, 1, 32, 32] compared position by position: 0 when they are the same."""
    _check_glyphs(first)
    _check_glyphs(second)
    if first.shape != second.shape:
        raise SaRAError(f"cannot compare {first.shape[0]} glyphs with {second.shape[0]}")
    return float((_blurred(first) - _blurred(second)).pow(2).mean().sqrt())


def style_distance(generated: torch.Tensor, chars: Sequence[str], font: Font) -> float:
    """``glyph_distance`` between ``generated`` [N, 1, 32, 32] and ``font``'s renderings of the same
    ``chars``: 0 is a perfect copy."""
    _check_glyphs(generated, chars)
    return glyph_distance(generated, render_glyphs(font, list(chars)))


def style_distances(generated: torch.Tensor, chars: Sequence[str]) -> dict[str, float]:
    """``style_distance`` to every catalogued font, keyed by its style words, nearest first."""
    distances = {font.style: style_distance(generated, chars, font) for font in ALL_FONTS}
    return dict(sorted(distances.items(), key=lambda item: item[1]))


def slant_degrees(glyphs: torch.Tensor) -> torch.Tensor:
    """Slant of each glyph in ``glyphs`` [N, 1, 32, 32] in degrees, float32 [N]: the angle from the
    vertical of the ink-weighted least-squares line x = a + b*y, positive leaning right.

    Averaged over the 62 characters, the upright catalogued fonts measure between -1.5 and 0 degrees
    and the held-out STIX General Italic +12.3.
    """
    _check_glyphs(glyphs)
    ink = (glyphs.detach().float().cpu()[:, 0] + 1) / 2
    weights = ink / ink.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    rows = torch.arange(GLYPH_SIZE, dtype=torch.float32).view(1, GLYPH_SIZE, 1)
    columns = torch.arange(GLYPH_SIZE, dtype=torch.float32).view(1, 1, GLYPH_SIZE)
    row_mean = (weights * rows).sum(dim=(1, 2), keepdim=True)
    column_mean = (weights * columns).sum(dim=(1, 2), keepdim=True)
    covariance = (weights * (columns - column_mean) * (rows - row_mean)).sum(dim=(1, 2))
    row_variance = (weights * (rows - row_mean) ** 2).sum(dim=(1, 2)).clamp_min(1e-6)
    return torch.rad2deg(torch.atan(-covariance / row_variance))  # rows grow downwards
