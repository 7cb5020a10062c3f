"""``make demo`` (``python -m sara_train.demo``): SaRA teaches the embedded glyph model a new font.

The committed base model (``sara_train/demo/base``) draws upright characters in 14 fonts. The
demo fine-tunes it with SaRA on STIX General Italic, a font (and a slant) it has never seen, using
only some of the characters, then draws the others (held out: never shown in the new font) before
and after. Everything goes through the same training loop as ``sara-train train``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.errors import SaRAError
from ..trainer.config import LoopConfig
from ..trainer.interrupts import Interrupted, StopSignals
from ..trainer.loop import TrainResult, run_training
from ..trainer.types import PromptEmbedding, TrainingExample
from .glyphs import CHARACTERS, HELD_OUT_FONT, glyph_prompt, render_glyphs
from .metrics import character_accuracy, style_distances
from .model import GlyphModel, generate, glyph_grid, load_glyph_model

FINETUNE_CHARACTERS = "abdefhkmnrsuyBEGHKMRT247"
"""The only characters the fine-tune shows the model in the new font (24 of 62)."""
HELD_OUT_CHARACTERS = "".join(char for char in CHARACTERS if char not in FINETUNE_CHARACTERS)
"""Never shown in the new font: the before/after grid and the measurements use these 38."""


@dataclass
class DemoReport:
    """Measured on the held-out characters, before and after the fine-tune."""

    accuracy_before: float
    accuracy_after: float
    nearest_style_before: str
    nearest_style_after: str
    distance_to_target_before: float
    distance_to_target_after: float


def demo_config(output_dir: Path, steps: int, seed: int, resume: bool = False) -> LoopConfig:
    """The fine-tune's settings (chosen to finish in a few minutes on 2 CPU cores)."""
    return LoopConfig(
        output_dir=str(output_dir),
        steps=steps,
        batch_size=16,
        learning_rate=2e-3,
        budget=0.05,
        rank_weight=1e-4,
        rank_layers_per_step=8,
        progressive_fraction=0.5,
        seed=seed,
        log_every=10,
        delta_dtype="fp16",
        resume=resume,
    )


def finetune_examples(model: GlyphModel, chars: str) -> list[TrainingExample]:
    """One example per character: the held-out font's glyph and its encoded prompt."""
    glyphs = render_glyphs(HELD_OUT_FONT, list(chars))
    with torch.no_grad():
        hidden = model.encode_prompts([glyph_prompt(char, HELD_OUT_FONT.style) for char in chars])
    return [TrainingExample(glyph, PromptEmbedding(states)) for glyph, states in zip(glyphs, hidden)]


def draw_held_out(model: GlyphModel, seed: int) -> torch.Tensor:
    """The held-out characters as the model draws them in the new style: [N, 1, 32, 32]."""
    model.unet.eval()
    return generate(model, [glyph_prompt(char, HELD_OUT_FONT.style) for char in HELD_OUT_CHARACTERS], seed=seed)


def measure(before: torch.Tensor, after: torch.Tensor) -> DemoReport:
    chars = list(HELD_OUT_CHARACTERS)
    styles_before, styles_after = style_distances(before, chars), style_distances(after, chars)
    return DemoReport(
        character_accuracy(before, chars),
        character_accuracy(after, chars),
        next(iter(styles_before)),
        next(iter(styles_after)),
        styles_before[HELD_OUT_FONT.style],
        styles_after[HELD_OUT_FONT.style],
    )


def clear_previous_demo(output_dir: Path) -> None:
    """Remove what an earlier demo run left in ``output_dir`` (only the demo's own file names)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / "state", ignore_errors=True)
    for pattern in ("sara_delta*.safetensors", "loss.csv", "loss.png", "before_after.png"):
        for path in output_dir.glob(pattern):
            path.unlink()


def run_demo(
    output_dir: Path, steps: int, seed: int = 0, resume: bool = False
) -> tuple[TrainResult, DemoReport | None]:
    """Fine-tune, then write ``before_after.png`` (and the run's files) to ``output_dir``.

    ``resume`` continues an interrupted demo run in ``output_dir`` (else its files are cleared
    first). If a signal stops the fine-tune, returns ``(result, None)``: the last completed step is
    saved, nothing is drawn."""
    if not resume:
        clear_previous_demo(output_dir)
    model = load_glyph_model()
    before = draw_held_out(model, seed)
    config = demo_config(output_dir, steps, seed, resume)
    result = run_training(
        model.unet,
        model.noise_scheduler,
        finetune_examples(model, FINETUNE_CHARACTERS),
        config,
        delta_metadata={"demo": "glyphs", "font": HELD_OUT_FONT.file_name, "characters": FINETUNE_CHARACTERS},
    )
    if result.interrupted:
        return result, None
    after = draw_held_out(model, seed)
    target = render_glyphs(HELD_OUT_FONT, list(HELD_OUT_CHARACTERS))
    comparison_grid(target, before, after, steps).save(output_dir / "before_after.png")
    return result, measure(before, after)


def comparison_grid(target: torch.Tensor, before: torch.Tensor, after: torch.Tensor, steps: int):
    """Target font / base model / after SaRA, for every held-out character, in two blocks of rows."""
    half = (len(HELD_OUT_CHARACTERS) + 1) // 2
    rows, labels = [], []
    for block in (slice(0, half), slice(half, None)):
        rows += [list(target[block]), list(before[block]), list(after[block])]
        labels += [f"{HELD_OUT_FONT.style} (the font)", "base model", f"after SaRA, {steps} steps"]
    return glyph_grid(rows, labels)


def summary(output_dir: Path, result: TrainResult, report: DemoReport, seconds: float) -> str:
    """The paragraph printed at the end: what happened, what was measured, where the files are."""
    first, last = result.losses[0].loss, result.losses[-1].loss
    return (
        f"SaRA fine-tuned the embedded glyph model on {HELD_OUT_FONT.file_name} ('{HELD_OUT_FONT.style}', a "
        f"font the base never saw) with {len(FINETUNE_CHARACTERS)} characters, training {result.num_trainable:,} "
        f"sparse entries for {len(result.losses)} steps (loss {first:.3f} -> {last:.3f}; the whole demo took "
        f"{seconds:.0f} s). "
        f"On the {len(HELD_OUT_CHARACTERS)} held-out characters it never saw in that font, the nearest catalogued "
        f"style went from '{report.nearest_style_before}' to '{report.nearest_style_after}' (pixel distance to the "
        f"target font {report.distance_to_target_before:.3f} -> {report.distance_to_target_after:.3f}), and "
        f"{report.accuracy_after:.0%} are still read as the right character (base: {report.accuracy_before:.0%}). "
        f"Before/after grid: {output_dir / 'before_after.png'}; loss plot: {output_dir / 'loss.png'} "
        f"(log: {output_dir / 'loss.csv'}); delta: {result.delta_path} "
        f"(inspect it with `sara-train inspect {result.delta_path}`)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sara_train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo run in --out")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with StopSignals():
        try:
            result, report = run_demo(args.out, args.steps, args.seed, args.resume)
        except SaRAError as error:
            print(f"demo: error: {error}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            print(
                f"\ndemo: {stop.signal_name}: stopped outside training; every file written is complete "
                f"(run the demo again)",
                file=sys.stderr,
            )
            return stop.exit_status
    if report is None:
        saved = (
            f"saved step {len(result.losses)}: {result.delta_path}; continue with --resume"
            if result.delta_path
            else "nothing was saved"
        )
        print(f"\ndemo: {result.interruption.signal_name} while {result.stopped_while}; {saved}", file=sys.stderr)
        return result.interruption.exit_status
    print("\n" + summary(args.out, result, report, time.monotonic() - started))
    return 0
