"""Glyph images rendered from the TrueType fonts matplotlib ships, and the demo's font catalogue.

A glyph is a float32 tensor [1, 32, 32] in [-1, 1]: white ink (+1) on black paper (-1). Every font
is rendered at the same pixel size on the same baseline, so x-height, cap height, ascenders and
descenders differ as they do in print; each glyph is centred horizontally on its ink. Rendering is
4x supersampled and box-filtered down, so strokes are anti-aliased the same way in every font.

The catalogue: ``PRETRAINING_FONTS`` are upright fonts only. ``HELD_OUT_FONT`` (STIX General
Italic, style "times italic") is the demo's fine-tuning target: the base model never sees a
slanted glyph or the word "italic", so a successful fine-tune is visible at a glance.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..engine.errors import SaRAError

GLYPH_SIZE = 32
"""Side of a glyph image in pixels."""
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits
"""The 62 characters every catalogued font renders: a-z, A-Z, 0-9."""
FONT_PIXELS = 26
"""Font size (em) in glyph pixels; the widest glyph (DejaVu Serif Bold "W") still fits."""
BASELINE = 23
"""Row of the baseline in glyph pixels (ascenders reach row ~2, descenders row ~29)."""
MARGIN = 1
"""Ink never comes closer than this to the image border (wider glyphs are shrunk to fit)."""
SUPERSAMPLING = 4


@dataclass(frozen=True)
class Font:
    """One catalogued font: its file in matplotlib's ``mpl-data/fonts/ttf`` and the style words
    prompts use for it (e.g. "serif bold")."""

    file_name: str
    style: str

    @property
    def path(self) -> Path:
        return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / self.file_name


PRETRAINING_FONTS: tuple[Font, ...] = (
    Font("DejaVuSans.ttf", "sans"),
    Font("DejaVuSans-Bold.ttf", "sans bold"),
    Font("DejaVuSansMono.ttf", "mono"),
    Font("DejaVuSansMono-Bold.ttf", "mono bold"),
    Font("DejaVuSerif.ttf", "serif"),
    Font("DejaVuSerif-Bold.ttf", "serif bold"),
    Font("STIXGeneral.ttf", "times"),
    Font("STIXGeneralBol.ttf", "times bold"),
    Font("cmr10.ttf", "roman"),
    Font("cmb10.ttf", "roman bold"),
    Font("cmss10.ttf", "sans light"),
    Font("cmtt10.ttf", "typewriter"),
)
"""The base model's training fonts: all upright (no italic or oblique font, no word "italic")."""
HELD_OUT_FONT = Font("STIXGeneralItalic.ttf", "times italic")
"""The demo's fine-tuning target: STIX General Italic, a font (and a slant) the base never saw."""
ALL_FONTS: tuple[Font, ...] = (*PRETRAINING_FONTS, HELD_OUT_FONT)


def _ink_box(font: ImageFont.FreeTypeFont, char: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``char``'s ink relative to its left-baseline anchor."""
    return font.getbbox(char, anchor="ls")


@cache
def _truetype(path: Path, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), pixels)


def render_glyph(font: Font, char: str) -> torch.Tensor:
    """``char`` in ``font`` as a float32 tensor [1, 32, 32] in [-1, 1] (ink +1, paper -1).

    Raises ``SaRAError`` if ``char`` is not one of ``CHARACTERS``, the font file is missing, or the
    font has no glyph for ``char`` (it would draw a placeholder box).
    """
    if len(char) != 1 or char not in CHARACTERS:
        raise SaRAError(f"cannot render {char!r}: glyphs are one of {CHARACTERS!r}")
    if not font.path.is_file():
        raise SaRAError(f"font file {font.path} not found (matplotlib's bundled fonts)")
    if ord(char) not in _character_map(font.path):
        raise SaRAError(f"font {font.path.name} has no glyph for {char!r}")
    scale = SUPERSAMPLING
    pixels = FONT_PIXELS * scale
    usable = (GLYPH_SIZE - 2 * MARGIN) * scale
    truetype = _truetype(font.path, pixels)
    left, top, right, bottom = _ink_box(truetype, char)
    baseline = BASELINE * scale
    shrink = min(
        1.0,
        usable / (right - left),
        (baseline - MARGIN * scale) / max(1, -top),
        (GLYPH_SIZE * scale - MARGIN * scale - baseline) / max(1, bottom),
    )
    if shrink < 1.0:
        truetype = _truetype(font.path, int(pixels * shrink))
        left, top, right, bottom = _ink_box(truetype, char)
    canvas = Image.new("L", (GLYPH_SIZE * scale, GLYPH_SIZE * scale), 0)
    x = GLYPH_SIZE * scale / 2 - (left + right) / 2
    ImageDraw.Draw(canvas).text((x, baseline), char, fill=255, font=truetype, anchor="ls")
    small = canvas.resize((GLYPH_SIZE, GLYPH_SIZE), Image.Resampling.BOX)
    ink = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
    return (ink * 2 - 1).unsqueeze(0)


@cache
def _character_map(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont  # matplotlib's own dependency

    with TTFont(str(path), lazy=True) as ttfont:
        return frozenset((ttfont.getBestCmap() or {}).keys())


@cache
def _render_font_cached(file_name: str, style: str) -> torch.Tensor:
    font = Font(file_name, style)
    return torch.stack([render_glyph(font, char) for char in CHARACTERS])


def render_font(font: Font) -> torch.Tensor:
    """All ``CHARACTERS`` in ``font``: float32 [62, 1, 32, 32] in [-1, 1], in ``CHARACTERS`` order.
    Cached per font; the returned tensor is a fresh copy the caller may modify."""
    return _render_font_cached(font.file_name, font.style).clone()


def render_glyphs(font: Font, chars: str | list[str]) -> torch.Tensor:
    """``chars`` in ``font``: float32 [len(chars), 1, 32, 32] in [-1, 1], in the order given."""
    sheet = _render_font_cached(font.file_name, font.style)
    return torch.stack([sheet[character_index(char)] for char in chars])


def character_index(char: str) -> int:
    """Position of ``char`` in ``CHARACTERS``; ``SaRAError`` if it is not one of them."""
    index = CHARACTERS.find(char) if len(char) == 1 else -1
    if index < 0:
        raise SaRAError(f"{char!r} is not a glyph character; expected one of {CHARACTERS!r}")
    return index


def glyph_prompt(char: str, style: str = "") -> str:
    """The caption of a glyph: ``"the letter g, serif bold"``, ``"the digit 7, mono"``; without a
    style ``"the letter g"``. Letters keep their case ("the letter G" is the capital)."""
    character_index(char)
    kind = "digit" if char.isdigit() else "letter"
    return f"the {kind} {char}, {style}" if style else f"the {kind} {char}"
