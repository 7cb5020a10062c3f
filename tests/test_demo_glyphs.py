"""The glyph demo's pieces: font rendering and catalogue, the word-level text encoder, the committed
base model (it loads and draws the right characters) and the character-accuracy metric."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sara_train.demo.glyphs import (
    ALL_FONTS,
    CHARACTERS,
    GLYPH_SIZE,
    HELD_OUT_FONT,
    PRETRAINING_FONTS,
    glyph_prompt,
    render_font,
    render_glyphs,
)
from sara_train.demo.metrics import (
    character_accuracy,
    recognise_characters,
    slant_degrees,
    style_distance,
    style_distances,
)
from sara_train.demo.model import BASE_FOLDER, generate, glyph_grid, load_glyph_model, save_glyph_model
from sara_train.demo.text import (
    PAD,
    START,
    TextEncoder,
    TextEncoderConfig,
    glyph_vocabulary,
    load_text_encoder,
    save_text_encoder,
)
from sara_train.engine.errors import SaRAError

HELD_OUT_CHARS = "gqzAQW58"
"""A few characters the demo keeps out of its fine-tuning set."""


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_glyph_model()


# ----------------------------------------------------------------------------- rendering, catalogue
@pytest.mark.parametrize("font", ALL_FONTS, ids=lambda font: font.style)
def test_every_catalogued_font_renders_every_character_inside_the_box(font) -> None:
    sheet = render_font(font)
    assert sheet.shape == (len(CHARACTERS), 1, GLYPH_SIZE, GLYPH_SIZE) and sheet.dtype == torch.float32
    assert sheet.min() == -1.0 and sheet.max() <= 1.0
    ink = (sheet > 0).flatten(1).sum(dim=1)
    assert (ink >= 8).all(), [CHARACTERS[i] for i in torch.nonzero(ink < 8).flatten()]
    border = torch.cat([sheet[..., 0, :], sheet[..., -1, :], sheet[..., :, 0], sheet[..., :, -1]], dim=-1)
    assert (border == -1.0).all(), "ink touches the image border"
    distinct = torch.cdist(sheet.flatten(1), sheet.flatten(1)) + torch.eye(len(CHARACTERS)) * 1e3
    assert distinct.min() > 1.0, "two characters render the same (a missing-glyph box?)"


def test_fixed_size_keeps_case_and_descenders_apart() -> None:
    x, big_x, p = render_glyphs(PRETRAINING_FONTS[0], ["x", "X", "p"])
    rows_with_ink = lambda glyph: torch.nonzero((glyph[0] > 0).any(dim=1)).flatten()
    assert rows_with_ink(big_x)[0] < rows_with_ink(x)[0] - 3, "capital X is not taller than x"
    assert rows_with_ink(p)[-1] > rows_with_ink(x)[-1] + 3, "p has no descender below the baseline"


def test_held_out_font_and_its_style_word_are_not_pretrained() -> None:
    assert HELD_OUT_FONT not in PRETRAINING_FONTS
    pretraining_words = {word for font in PRETRAINING_FONTS for word in font.style.split()}
    assert "italic" in HELD_OUT_FONT.style.split() and "italic" not in pretraining_words
    assert all("Italic" not in font.file_name and "Oblique" not in font.file_name for font in PRETRAINING_FONTS)
    assert slant_degrees(render_font(HELD_OUT_FONT)).mean() > 10
    for font in PRETRAINING_FONTS:
        assert abs(slant_degrees(render_font(font)).mean()) < 2, font
        assert style_distance(render_font(HELD_OUT_FONT), list(CHARACTERS), font) > 0.18, font


def test_glyph_prompt_and_bad_characters() -> None:
    assert glyph_prompt("g", "serif bold") == "the letter g, serif bold"
    assert glyph_prompt("G") == "the letter G"
    assert glyph_prompt("7", "mono") == "the digit 7, mono"
    with pytest.raises(SaRAError, match="'#'"):
        render_glyphs(HELD_OUT_FONT, ["#"])


# ----------------------------------------------------------------------------- text encoder
def test_tokenizer_keeps_case_pads_and_names_unknown_words() -> None:
    encoder = TextEncoder(TextEncoderConfig(tuple(glyph_vocabulary())))
    tokenizer = encoder.tokenizer
    ids = tokenizer.encode(["the letter g, serif bold", "the letter G, serif bold", ""])
    assert ids.shape == (3, encoder.config.max_length) and ids.dtype == torch.long
    vocabulary = tokenizer.vocabulary
    assert [vocabulary[i] for i in ids[0]] == [START, "the", "letter", "g", "serif", "bold", PAD, PAD]
    assert ids[0, 3] != ids[1, 3]
    assert [vocabulary[i] for i in ids[2]] == [START] + [PAD] * (encoder.config.max_length - 1)
    with pytest.raises(SaRAError, match=r"unknown word 'fancy'.*typewriter"):
        tokenizer.encode(["the letter g, fancy"])
    with pytest.raises(SaRAError, match="at most 7"):
        tokenizer.encode(["the letter g sans sans sans sans sans"])


def test_text_encoder_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = TextEncoder(TextEncoderConfig(tuple(glyph_vocabulary()), width=64, layers=1, heads=2)).eval()
    save_text_encoder(encoder, tmp_path)
    loaded = load_text_encoder(tmp_path)
    assert loaded.config == encoder.config
    prompts = ["the letter g, times italic", "the digit 0", ""]
    with torch.no_grad():
        hidden = encoder.encode(prompts)
        assert hidden.shape == (3, encoder.config.max_length, 64)
        assert torch.equal(loaded.encode(prompts), hidden)
    (tmp_path / "text_encoder.json").write_text('{"vocabulary": ["a"]}')
    with pytest.raises(SaRAError, match="text_encoder.json"):
        load_text_encoder(tmp_path)


# ----------------------------------------------------------------------------- committed base
def test_committed_base_is_small_and_round_trips(base, tmp_path: Path) -> None:
    size = sum(path.stat().st_size for path in BASE_FOLDER.iterdir())
    assert size < 15e6, size
    save_glyph_model(base, tmp_path)
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        saved, committed = load_file(tmp_path / name), load_file(BASE_FOLDER / name)
        assert saved.keys() == committed.keys()
        assert all(torch.equal(saved[key], committed[key]) for key in saved)
    with pytest.raises(SaRAError, match="config.json"):
        load_glyph_model(tmp_path / "missing")


def test_base_draws_the_requested_characters(base) -> None:
    """One held-out character per pretraining style; measured: 12/12 (and 62/62 over all styles
    with 30 steps). The threshold leaves room for one miss in ten."""
    chars = [HELD_OUT_CHARS[i % len(HELD_OUT_CHARS)] for i in range(len(PRETRAINING_FONTS))]
    prompts = [glyph_prompt(char, font.style) for char, font in zip(chars, PRETRAINING_FONTS)]
    glyphs = generate(base, prompts, seed=0, steps=15)
    assert glyphs.shape == (len(prompts), 1, GLYPH_SIZE, GLYPH_SIZE)
    assert glyphs.min() >= -1 and glyphs.max() <= 1
    assert character_accuracy(glyphs, chars) >= 0.9, recognise_characters(glyphs)
    nearest = [next(iter(style_distances(glyph[None], [char]))) for glyph, char in zip(glyphs, chars)]
    assert sum(style == font.style for style, font in zip(nearest, PRETRAINING_FONTS)) >= 6, nearest


def test_generate_is_seeded(base) -> None:
    prompts = [glyph_prompt("g", "sans"), glyph_prompt("g", "sans")]
    first = generate(base, prompts, seed=3, steps=4)
    assert torch.equal(first, generate(base, prompts, seed=3, steps=4))
    assert not torch.equal(first[0], first[1])


# ----------------------------------------------------------------------------- metric, grid
def test_character_accuracy_recognises_fonts_and_rejects_wrong_labels() -> None:
    italic = render_glyphs(HELD_OUT_FONT, list(CHARACTERS))
    assert character_accuracy(italic, list(CHARACTERS)) == 1.0
    shuffled = list(CHARACTERS[1:] + CHARACTERS[0])
    assert character_accuracy(italic, shuffled) == 0.0
    assert character_accuracy(-torch.ones(4, 1, GLYPH_SIZE, GLYPH_SIZE), list("abcd")) <= 0.25
    with pytest.raises(SaRAError, match="3 glyphs but 2"):
        character_accuracy(italic[:3], ["a", "b"])


def test_glyph_grid_lays_out_labelled_rows() -> None:
    glyphs = list(render_glyphs(HELD_OUT_FONT, list("abc")))
    image = glyph_grid([glyphs, glyphs[:2]], ["target font", "after"], ["a", "b", "c"], scale=2)
    assert image.mode == "RGB" and image.height == 22 + 2 * (64 + 2)
    assert image.width > 3 * 64
    with pytest.raises(SaRAError, match="2 rows but 1 labels"):
        glyph_grid([glyphs, glyphs], ["only one"])
