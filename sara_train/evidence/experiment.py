"""One measured fine-tune: a method teaches the glyph base a new font, then is scored.

Every run of an experiment sees the same data and the same random draws whatever the method: the
examples, noise and timesteps of step ``i`` come from a CPU generator seeded with the run's seed
only, and the evaluation samples start from the same noise. A run:
  1. loads the base glyph model, makes it trainable with ``make_trainable``;
  2. trains ``steps`` steps of ``batch_size`` on the target font's ``FINETUNE_CHARACTERS``
     (v-prediction MSE, the base's noise schedule);
  3. draws the ``HELD_OUT_CHARACTERS`` in the target style and ``PRIOR_PROMPTS`` in the
     pretraining styles, and scores them (``RunScores``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..demo.glyphs import CHARACTERS, PRETRAINING_FONTS, Font, glyph_prompt, render_glyphs
from ..demo.metrics import character_accuracy, glyph_distance, style_distance
from ..demo.model import GlyphModel, generate, load_glyph_model
from ..demo.run import FINETUNE_CHARACTERS, HELD_OUT_CHARACTERS
from ..engine.errors import SaRAError
from ..trainer.objective import training_target
from .features import frechet_distance, glyph_features
from .methods import METHODS, make_trainable

TARGET_FONTS: dict[str, Font] = {
    font.style: font
    for font in (
        Font("STIXGeneralItalic.ttf", "times italic"),
        Font("DejaVuSerif-Italic.ttf", "serif italic"),
        Font("DejaVuSansMono-Oblique.ttf", "mono italic"),
    )
}
"""The fine-tuning tasks: three slanted fonts matplotlib ships, none seen in pretraining, each named
with words the base's text encoder knows."""
PRIOR_PROMPTS: tuple[str, ...] = tuple(
    glyph_prompt(CHARACTERS[(7 * index + offset) % len(CHARACTERS)], font.style)
    for index, font in enumerate(PRETRAINING_FONTS)
    for offset in (0, 31)
)
"""Prior-preservation probes: two characters in each of the 12 pretraining styles (24 prompts)."""
EVALUATION_SEED = 1234
"""Seed of the evaluation samples' starting noise (the same for every run)."""


@dataclass(frozen=True)
class RunSpec:
    """What one run does. ``budget`` is a fraction of the targeted entries (ignored for "full")."""

    method: str
    budget: float
    font: str
    seed: int
    learning_rate: float
    steps: int
    batch_size: int
    sampler_steps: int

    @property
    def key(self) -> str:
        """Identifies the run in a results file."""
        return (
            f"{self.method}|{self.budget:g}|{self.font}|{self.seed}|{self.learning_rate:g}|{self.steps}"
            f"|{self.batch_size}|{self.sampler_steps}"
        )


@dataclass(frozen=True)
class RunScores:
    """A run's measurements (on the held-out characters unless said otherwise).

    ``frechet``: style fit, ``frechet_distance`` of generated vs real target glyphs in the feature
    space of ``glyph_feature_net`` (lower is better). ``pixel``: ``style_distance`` to the target
    font (lower is better). ``accuracy``: fraction recognised as the intended character (higher is
    better). ``drift``: ``glyph_distance`` between this model's and the base's drawings of
    ``PRIOR_PROMPTS`` from the same noise (0 = the pretraining styles are untouched). ``loss``: mean
    training loss over the last 10% of steps. ``trainable``: trainable entries. ``seconds``: wall time.
    """

    frechet: float
    pixel: float
    accuracy: float
    drift: float
    loss: float
    trainable: int
    seconds: float


def target_font(style: str) -> Font:
    try:
        return TARGET_FONTS[style]
    except KeyError:
        raise SaRAError(f"unknown target font {style!r}; choose from {sorted(TARGET_FONTS)}") from None


@cache
def _base_drawings(prompts: tuple[str, ...], sampler_steps: int) -> torch.Tensor:
    return generate(load_glyph_model(), list(prompts), seed=EVALUATION_SEED, steps=sampler_steps)


def evaluation_prompts(font: Font) -> list[str]:
    """The held-out characters in ``font``'s style, then ``PRIOR_PROMPTS``."""
    return [glyph_prompt(char, font.style) for char in HELD_OUT_CHARACTERS] + list(PRIOR_PROMPTS)


def score(model: GlyphModel, font: Font, sampler_steps: int) -> dict[str, float]:
    """Draw and measure (see ``RunScores``; everything but loss, trainable and seconds)."""
    prompts = evaluation_prompts(font)
    drawn = generate(model, prompts, seed=EVALUATION_SEED, steps=sampler_steps)
    held_out, prior = drawn[: len(HELD_OUT_CHARACTERS)], drawn[len(HELD_OUT_CHARACTERS) :]
    base_prior = _base_drawings(tuple(prompts), sampler_steps)[len(HELD_OUT_CHARACTERS) :]
    chars = list(HELD_OUT_CHARACTERS)
    real = render_glyphs(font, chars)
    return {
        "frechet": frechet_distance(glyph_features(held_out), glyph_features(real)),
        "pixel": style_distance(held_out, chars, font),
        "accuracy": character_accuracy(held_out, chars),
        "drift": glyph_distance(prior, base_prior),
    }


def score_base_model(style: str, sampler_steps: int) -> dict[str, float]:
    """``score`` of the base model itself for the target font ``style`` (drift is 0 by definition)."""
    return score(load_glyph_model(), target_font(style), sampler_steps)


def run_one(spec: RunSpec) -> RunScores:
    """Fine-tune the base glyph model as ``spec`` says and score it (module docstring)."""
    started = time.perf_counter()
    font = target_font(spec.font)
    model = load_glyph_model()
    with torch.no_grad():
        prompts = model.encode_prompts([glyph_prompt(char, font.style) for char in FINETUNE_CHARACTERS])
    glyphs = render_glyphs(font, list(FINETUNE_CHARACTERS))
    optimizer, trainable = make_trainable(
        METHODS[spec.method], model.unet, spec.budget, spec.learning_rate, spec.steps, spec.seed
    )
    losses = train_denoising(
        model, glyphs, prompts, optimizer, spec.steps, spec.batch_size, torch.Generator().manual_seed(spec.seed)
    )
    model.unet.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    scores = score(model, font, spec.sampler_steps)
    return RunScores(
        **scores,
        loss=sum(tail) / len(tail),
        trainable=trainable,
        seconds=time.perf_counter() - started,
    )


def train_denoising(
    model: GlyphModel,
    glyphs: torch.Tensor,
    prompts: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``steps`` optimizer steps of v-prediction MSE (the base's noise schedule) on ``glyphs``
    [N, 1, 32, 32] captioned by ``prompts`` [N, L, D]: each step draws ``batch_size`` examples (with
    replacement), noise and timesteps from ``generator`` alone. Calls ``after_step(step)`` (1-based)
    after each step; returns the losses. Leaves ``model.unet`` in train mode."""
    scheduler = model.noise_scheduler
    model.unet.train()
    losses = []
    for step in range(1, steps + 1):
        pick = torch.randint(len(glyphs), (batch_size,), generator=generator)
        noise = torch.randn(batch_size, *glyphs.shape[1:], generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        clean = glyphs[pick]
        prediction = model.unet(scheduler.add_noise(clean, noise, timesteps), timesteps, prompts[pick]).sample
        loss = F.mse_loss(prediction, training_target(scheduler, clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses


def run_record(spec: RunSpec) -> dict:
    """``run_one`` as one JSON-ready record: the spec's fields, ``"key"`` and the scores' fields."""
    return {**asdict(spec), "key": spec.key, **asdict(run_one(spec))}


def vlhi(frechet: list[float], accuracy: list[float]) -> list[float]:
    """The paper's Visual-Linguistic Harmony Index of each of n compared models: min-max normalised
    style fit (lower Fréchet distance scores higher) plus min-max normalised fidelity (here
    character accuracy for the paper's CLIP score); from 0 to 2. A metric on which all n are equal
    adds 0 for every model. Raises ``SaRAError`` for lists of different lengths or fewer than 2."""
    if len(frechet) != len(accuracy) or len(frechet) < 2:
        raise SaRAError(f"VLHI compares n >= 2 models; got {len(frechet)} distances and {len(accuracy)} accuracies")

    def normalised(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [(value - low) / (high - low) if high > low else 0.0 for value in values]

    fits = normalised([-value for value in frechet])
    fidelities = normalised(accuracy)
    return [fit + fidelity for fit, fidelity in zip(fits, fidelities)]
