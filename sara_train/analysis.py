"""Looking at a model before choosing a budget: the |w| histogram and budget -> threshold.

This is the paper's Fig. 2a: most pretrained weights are far from zero, and a budget of a few
percent picks a threshold in the thin tail near zero.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from PIL import Image, ImageDraw

from .selection import budget_to_count, kth_smallest_magnitude, next_float_above

LOG10_RANGE = (-8.0, 1.0)


def threshold_for_budget(weights: Sequence[torch.Tensor], budget: float | int) -> float:
    """The threshold SaRA uses for ``budget`` over ``weights`` (every selected entry has |w| below it)."""
    total = sum(w.numel() for w in weights)
    return next_float_above(kth_smallest_magnitude(weights, budget_to_count(budget, total)).value)


def magnitude_histogram(weights: Iterable[torch.Tensor], bins: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edges [bins+1], counts [bins])`` of log10|w| over ``LOG10_RANGE``; exact zeros and tinier
    magnitudes fall in the first bin. One tensor at a time."""
    low, high = LOG10_RANGE
    counts = torch.zeros(bins, dtype=torch.float64)
    for w in weights:
        logs = w.detach().reshape(-1).abs().float().clamp_min(10.0 ** low).log10().clamp_max(high)
        counts += torch.histc(logs, bins=bins, min=low, max=high).double().cpu()
    return torch.linspace(low, high, bins + 1), counts


def draw_histogram(edges: torch.Tensor, counts: torch.Tensor, thresholds: dict[str, float],
                   size: tuple[int, int] = (640, 360)) -> Image.Image:
    """The histogram as bars (height ∝ count) with a labelled vertical line per threshold."""
    width, height = size
    margin = 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    low, high = float(edges[0]), float(edges[-1])
    x_of = lambda log_value: margin + (log_value - low) / (high - low) * (width - 2 * margin)
    peak = float(counts.max()) or 1.0
    for i, count in enumerate(counts.tolist()):
        top = height - margin - count / peak * (height - 2 * margin)
        draw.rectangle([x_of(float(edges[i])), top, x_of(float(edges[i + 1])), height - margin], fill=(90, 120, 200))
    for exponent in range(math.ceil(low), math.floor(high) + 1):
        x = x_of(exponent)
        draw.line([x, height - margin, x, height - margin + 4], fill="black")
        draw.text((x - 10, height - margin + 6), f"1e{exponent}", fill="black")
    for row, (label, threshold) in enumerate(thresholds.items()):
        x = x_of(math.log10(max(threshold, 10.0 ** low)))
        draw.line([x, margin, x, height - margin], fill=(200, 40, 40), width=2)
        draw.text((x + 4, margin + 14 * row), f"{label}: {threshold:.3g}", fill=(200, 40, 40))
    draw.text((margin, 8), "|w| of targeted weights (log scale) and SaRA thresholds", fill="black")
    return image
