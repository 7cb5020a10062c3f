"""The paper's two observations (Sec. 3.1 and 3.2), measured on the glyph base.

Sec. 3.1: setting the smallest-|w| weights to zero barely changes what the model draws.
Sec. 3.2: those weights are small by accident of training, not for good: training on, most of them
leave the below-threshold set and other weights take their place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..demo.glyphs import CHARACTERS, PRETRAINING_FONTS, glyph_prompt, render_font
from ..demo.metrics import character_accuracy, glyph_distance
from ..demo.model import generate, load_glyph_model
from ..engine.analysis import threshold_for_budget, zero_small_weights_effect
from ..engine.config import SaRAConfig
from ..engine.selection import find_targets
from .experiment import EVALUATION_SEED, train_denoising

ZEROING_PROMPT_STYLES = ("sans", "serif bold")
"""Styles whose 62 characters the zeroing check draws (124 glyphs)."""


@dataclass(frozen=True)
class ZeroingResult:
    """The base with every targeted entry ``|w| < threshold`` set to zero. ``budget``: the share of
    targeted entries that is; ``accuracy``: character accuracy of the drawings (the base's is in
    the row with budget 0); ``drawing_change``: ``glyph_distance`` to the base's drawings from the
    same noise; ``output_change``: relative change of the drawn pixels (``zero_small_weights_effect``)."""

    budget: float
    threshold: float
    accuracy: float
    drawing_change: float
    output_change: float


def zeroing_check(budgets: list[float], sampler_steps: int) -> list[ZeroingResult]:
    """Sec. 3.1 on the glyph base: one row for the unchanged base (budget 0), then one per budget."""
    model = load_glyph_model()
    prompts = [glyph_prompt(char, style) for style in ZEROING_PROMPT_STYLES for char in CHARACTERS]
    chars = list(CHARACTERS) * len(ZEROING_PROMPT_STYLES)
    config = SaRAConfig()
    weights = [getattr(t.module, t.param_name) for t in find_targets(model.unet, config)]
    thresholds = [threshold_for_budget(weights, budget) for budget in budgets]
    drawings: list[torch.Tensor] = []

    def draw(unet) -> torch.Tensor:
        drawings.append(generate(model, prompts, seed=EVALUATION_SEED, steps=sampler_steps))
        return drawings[-1]

    rows = zero_small_weights_effect(model.unet, draw, thresholds, config)
    base = drawings[0]
    results = [ZeroingResult(0.0, 0.0, character_accuracy(base, chars), 0.0, 0.0)]
    for row, budget, drawn in zip(rows, budgets, drawings[1:]):
        accuracy, change = character_accuracy(drawn, chars), glyph_distance(drawn, base)
        results.append(ZeroingResult(budget, row.threshold, accuracy, change, row.relative_change))
    return results


@dataclass(frozen=True)
class PersistencePoint:
    """After ``step`` steps of continued pretraining: the shares of *all* targeted entries that are
    below the fixed threshold and were below it at step 0 (``still_small``), or were not
    (``newly_small``). At step 0 they are ``budget`` and 0."""

    step: int
    still_small: float
    newly_small: float


def small_weight_persistence(
    steps: int, every: int, budget: float = 0.01, batch_size: int = 16, learning_rate: float = 1e-4, seed: int = 0
) -> tuple[float, list[PersistencePoint]]:
    """Sec. 3.2 on the glyph base: continue pretraining it (all weights, AdamW, its own 12 fonts and
    captions, v-prediction MSE) for ``steps`` steps, recording every ``every`` steps where the
    entries below the ``budget`` threshold of step 0 stand. Returns ``(threshold, points)``."""
    model = load_glyph_model()
    unet = model.unet
    weights = [getattr(t.module, t.param_name) for t in find_targets(unet, SaRAConfig())]
    total = sum(w.numel() for w in weights)
    threshold = threshold_for_budget(weights, budget)
    initially_small = [w.detach().abs() < threshold for w in weights]
    glyphs = torch.cat([render_font(font) for font in PRETRAINING_FONTS])
    with torch.no_grad():
        prompts = model.encode_prompts(
            [glyph_prompt(char, font.style) for font in PRETRAINING_FONTS for char in CHARACTERS]
        )

    def point(step: int) -> PersistencePoint:
        still = newly = 0
        for weight, small_before in zip(weights, initially_small):
            small_now = weight.detach().abs() < threshold
            still += int((small_now & small_before).sum())
            newly += int((small_now & ~small_before).sum())
        return PersistencePoint(step, still / total, newly / total)

    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    points = [point(0)]

    def record(step: int) -> None:
        if step % every == 0 or step == steps:
            points.append(point(step))

    generator = torch.Generator().manual_seed(seed)
    train_denoising(model, glyphs, prompts, optimizer, steps, batch_size, generator, record)
    return threshold, points
