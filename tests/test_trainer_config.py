"""TrainConfig from TOML and flags: flags override the file, bad options are named."""

import argparse
from pathlib import Path

import pytest

from sara_train.engine.errors import SaRAError
from sara_train.trainer.config import TrainConfig, add_train_arguments, config_from_arguments
from sara_train.trainer.train import held_out_positions


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_arguments(parser.parse_args(list(argv)))


def test_flags_override_toml(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        'base = "b"\ndata = "d"\nlearning-rate = 3e-4\nsteps = 50\nsample_prompts = ["a cat", "a dog"]\nflip = true\n'
    )
    config = parse("--config", str(tmp_path / "run.toml"), "--steps", "7", "--no-flip", "--include", "attn")
    assert (config.base, config.learning_rate, config.steps, config.flip) == ("b", 3e-4, 7, False)
    assert config.sample_prompts == ["a cat", "a dog"] and config.include == ["attn"]
    assert config.batch_size == TrainConfig.batch_size  # untouched defaults stay
    config.validate()


def test_train_table_and_progressive_step(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('[train]\nbase = "b"\ndata = "d"\nsteps = 10\nprogressive_fraction = 0.3\n')
    config = parse("--config", str(tmp_path / "run.toml"))
    assert config.progressive_at == 3
    assert TrainConfig(base="b", data="d", steps=10, progressive_fraction=0.0).progressive_at is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("stepz = 3", "unknown option 'stepz'"),
        ('steps = "many"', "steps must be int"),
        ("steps = [", "not valid TOML"),
        ("include = [1]", "list of strings"),
    ],
)
def test_bad_toml_is_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(SaRAError, match=message):
        parse("--config", str(tmp_path / "bad.toml"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"base": ""}, "no base model"),
        ({"resolution": 500}, "multiple of 8"),
        ({"crop": "left"}, "--crop must be one of center, random"),
        ({"budget": 0.1, "threshold": 1e-3}, "not both"),
        ({"progressive_fraction": 1.0}, "progressive-fraction"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"snr_gamma": -1.0}, "--snr-gamma must be >= 0"),
        ({"validation_split": 1.0}, "--validation-split must be in"),
        ({"ema_decay": 1.0}, "--ema-decay must be in"),
        ({"caption_dropout": -0.1}, "--caption-dropout must be in"),
    ],
)
def test_validation_names_the_option(changes: dict, message: str) -> None:
    with pytest.raises(SaRAError, match=message):
        TrainConfig(**{"base": "b", "data": "d", **changes}).validate()


def test_missing_config_file() -> None:
    with pytest.raises(SaRAError, match="does not exist"):
        parse("--config", "/nonexistent/run.toml")


def test_validation_images_are_a_seeded_split() -> None:
    assert held_out_positions(10, 0.0, 0) == []
    held = held_out_positions(10, 0.3, 4)
    assert len(held) == 3 and held == sorted(set(held)) and all(0 <= i < 10 for i in held)
    assert held_out_positions(10, 0.3, 4) == held and held_out_positions(10, 0.3, 5) != held
    with pytest.raises(SaRAError, match="holds out 0: need at least one image to validate on"):
        held_out_positions(4, 0.1, 0)
