"""The demo end to end at 2 steps (the full 150-step run is `make demo`, run by CI): the committed
base loads, the fine-tune goes through the shared trainer loop, and every promised file appears."""

from pathlib import Path

import torch
from PIL import Image

from sara_train import SparseDelta
from sara_train.demo.glyphs import CHARACTERS, HELD_OUT_FONT
from sara_train.demo.model import load_glyph_model
from sara_train.demo.run import FINETUNE_CHARACTERS, HELD_OUT_CHARACTERS, main
from sara_train.trainer.logs import read_loss_log


def test_held_out_characters_are_never_trained() -> None:
    assert set(FINETUNE_CHARACTERS).isdisjoint(HELD_OUT_CHARACTERS)
    assert sorted(FINETUNE_CHARACTERS + HELD_OUT_CHARACTERS) == sorted(CHARACTERS)


def test_two_step_demo_writes_everything(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "state").mkdir(parents=True)
    (out / "state" / "training_state.safetensors").write_bytes(b"left by an earlier demo run")
    assert main(["--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "before_after.png") in printed and HELD_OUT_FONT.file_name in printed
    grid = Image.open(out / "before_after.png")
    assert grid.width > 19 * 96 and grid.height >= 6 * 96  # 2 blocks x (font, base, after) rows of 19 glyphs
    assert [row.step for row in read_loss_log(out / "loss.csv")] == [1, 2]
    assert (out / "loss.png").exists()
    delta = SparseDelta.load(out / "sara_delta.safetensors")
    assert delta.metadata["font"] == HELD_OUT_FONT.file_name and delta.metadata["characters"] == FINETUNE_CHARACTERS
    base = load_glyph_model()
    delta.to(torch.float32).apply_to(base.unet)  # diffusers names: applies to the glyph UNet as is
