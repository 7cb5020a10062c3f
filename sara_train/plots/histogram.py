"""The |w| histogram with SaRA's thresholds, as an image (the paper's Fig. 2a): ``sara-train
analyze`` writes it, the SaRA Inspect node shows it."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def draw_histogram(
    edges: torch.Tensor, counts: torch.Tensor, thresholds: dict[str, float], size: tuple[int, int] = (640, 360)
) -> Image.Image:
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
        x = x_of(math.log10(max(threshold, 10.0**low)))
        draw.line([x, margin, x, height - margin], fill=(200, 40, 40), width=2)
        draw.text((x + 4, margin + 14 * row), f"{label}: {threshold:.3g}", fill=(200, 40, 40))
    draw.text((margin, 8), "|w| of targeted weights (log scale) and SaRA thresholds", fill="black")
    return image
