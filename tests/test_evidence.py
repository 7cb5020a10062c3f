"""The evidence harness: its metrics against references, equal budgets and draws across methods,
the tables' arithmetic, and ``benchmarks/quality.py --quick`` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sara_train.demo.glyphs import CHARACTERS, PRETRAINING_FONTS, render_font, render_glyphs
from sara_train.demo.model import load_glyph_model
from sara_train.demo.run import FINETUNE_CHARACTERS
from sara_train.engine.errors import SaRAError
from sara_train.evidence.experiment import TARGET_FONTS, train_denoising, vlhi
from sara_train.evidence.features import (
    frechet_distance,
    gaussian_frechet_distance,
    glyph_feature_net,
    glyph_features,
    shear_and_shift,
)
from sara_train.evidence.methods import METHODS, make_trainable, targeted_entries
from sara_train.evidence.report import best_learning_rates, mean_std, summary_table, with_vlhi

REPO = Path(__file__).resolve().parents[1]


def test_gaussian_frechet_distance_matches_the_closed_forms() -> None:
    mean1, mean2 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0]).double()
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([9.0, 1.0, 0.25]).double()
    expected = float((mean1 - mean2).pow(2).sum() + (var1.sqrt() - var2.sqrt()).pow(2).sum())  # commuting case
    assert gaussian_frechet_distance(mean1, torch.diag(var1), mean2, torch.diag(var2)) == pytest.approx(expected)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=generator).double(), torch.randn(4, 4, generator=generator).double()
    cov1, cov2 = a @ a.T, b @ b.T  # not commuting: the distance is still symmetric
    zero = torch.zeros(4, dtype=torch.float64)
    assert gaussian_frechet_distance(zero, cov1, zero, cov2) == pytest.approx(
        gaussian_frechet_distance(zero, cov2, zero, cov1)
    )
    assert gaussian_frechet_distance(zero, cov1, zero, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples() -> None:
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(4000, 3, generator=generator)
    assert frechet_distance(samples, samples) == pytest.approx(0.0, abs=1e-9)
    shifted_and_scaled = torch.randn(4000, 3, generator=generator) * 2 + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(samples, shifted_and_scaled) == pytest.approx(1.0 + 3 * (2 - 1) ** 2, rel=0.1)
    with pytest.raises(SaRAError, match="at least 2 samples"):
        frechet_distance(samples[:1], samples)
    with pytest.raises(SaRAError, match="same D"):
        frechet_distance(samples, samples[:, :2])


def test_feature_net_knows_characters_and_slant() -> None:
    net = glyph_feature_net()
    glyphs = torch.cat([render_font(font) for font in PRETRAINING_FONTS])
    with torch.no_grad():
        character_logits, _, _ = net(glyphs)
        labels = torch.arange(len(CHARACTERS)).repeat(len(PRETRAINING_FONTS))
        assert float((character_logits.argmax(1) == labels).float().mean()) > 0.9
        upright = render_font(PRETRAINING_FONTS[0])
        leaning = [
            net(shear_and_shift(upright, torch.full((62,), s), torch.zeros(62, 2)))[2].mean() for s in (-0.3, 0.3)
        ]
        assert float(leaning[0]) < 0 < float(leaning[1])
    # the style-fit metric sees slant: more shear, further from the upright font
    distances = [
        frechet_distance(
            glyph_features(shear_and_shift(upright, torch.full((62,), s), torch.zeros(62, 2))), glyph_features(upright)
        )
        for s in (0.0, 0.15, 0.3)
    ]
    assert distances[0] < distances[1] < distances[2]


def test_vlhi_is_the_papers_min_max_sum() -> None:
    assert vlhi([1.0, 2.0, 3.0], [0.5, 1.0, 0.0]) == pytest.approx([1.5, 1.5, 0.0])
    assert vlhi([5.0, 5.0], [0.2, 0.9]) == pytest.approx([0.0, 1.0])  # equal Fréchet: adds nothing
    with pytest.raises(SaRAError, match="n >= 2"):
        vlhi([1.0], [0.5])


def record(method: str, seed: int, frechet: float, accuracy: float, rate: float = 1e-3, font: str = "f") -> dict:
    return {
        "method": method,
        "budget": 0.05,
        "font": font,
        "seed": seed,
        "learning_rate": rate,
        "frechet": frechet,
        "pixel": 0.1,
        "accuracy": accuracy,
        "drift": 0.01,
        "trainable": 100,
    }


def test_tables_average_over_fonts_then_seeds() -> None:
    records = [
        record("sara", 0, 10.0, 1.0),
        record("lora", 0, 20.0, 0.5),
        record("sara", 1, 10.0, 0.5),
        record("lora", 1, 30.0, 1.0),
    ]
    scored = {(r["method"], r["seed"]): r["vlhi"] for r in with_vlhi(records)}
    assert scored == {("sara", 0): 2.0, ("lora", 0): 0.0, ("sara", 1): 1.0, ("lora", 1): 1.0}
    table = summary_table(records)
    mean, std = mean_std([1.0, 0.5])
    assert f"{mean:.1%} ± {std:.1%}" in table.splitlines()[2]  # SaRA's accuracy over its two seeds
    assert "| SaRA @ 5% | 100 |" in table and "| 2 × 1 |" in table
    assert math.isclose(std, 0.3535533905932738)


def test_best_learning_rate_is_the_highest_vlhi_of_the_sweep() -> None:
    sweep = [
        record("sara", 100, 50.0, 0.9, rate=1e-3),
        record("sara", 100, 10.0, 1.0, rate=3e-3),
        record("lora", 100, 30.0, 1.0, rate=1e-3),
        record("lora", 100, 90.0, 0.2, rate=3e-3),
    ]
    assert best_learning_rates(sweep) == {"sara": 3e-3, "lora": 1e-3}


def test_methods_train_equal_budgets_on_identical_draws() -> None:
    """Every budgeted method gets about the same trainable count; at learning rate 0 every method's
    model equals the base, so identical draws give identical losses, step for step."""
    font = TARGET_FONTS["times italic"]
    glyphs = render_glyphs(font, list(FINETUNE_CHARACTERS[:6]))
    losses, counts = {}, {}
    for name in ("sara", "largest", "random", "sara_8bit", "sara_low_res", "lora", "supertuning", "full"):
        model = load_glyph_model()
        with torch.no_grad():
            prompts = model.encode_prompts([f"the letter {c}, {font.style}" for c in FINETUNE_CHARACTERS[:6]])
        optimizer, counts[name] = make_trainable(METHODS[name], model.unet, 0.01, 0.0, steps=2, seed=0)
        losses[name] = train_denoising(model, glyphs, prompts, optimizer, 2, 3, torch.Generator().manual_seed(7))
    budget = round(0.01 * targeted_entries(load_glyph_model().unet))
    assert counts["sara"] == counts["largest"] == counts["random"] == counts["sara_8bit"] == budget
    assert counts["sara_low_res"] == budget  # the same count, on the other layers
    assert abs(counts["supertuning"] - budget) / budget < 0.01
    assert abs(counts["lora"] - budget) / budget < 0.5  # the nearest whole rank
    assert counts["full"] == sum(p.numel() for p in load_glyph_model().unet.parameters())
    for name, values in losses.items():
        assert values == pytest.approx(losses["sara"], rel=1e-5), name


def test_quick_evidence_run_writes_every_table(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 + 4 + 7  # sweep, Table 1, Table 2 (SaRA's row shared with Table 1)
    for entry in records:
        assert all(math.isfinite(entry[key]) for key in ("frechet", "pixel", "accuracy", "drift", "loss"))
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["trainable"] > 0
    report = (out / "report.md").read_text()
    for heading in (
        "Reference: the base model",
        "Learning-rate sweep",
        "Table 1",
        "Per font",
        "Table 2",
        "Sec. 3.1",
        "Sec. 3.2",
    ):
        assert f" {heading}" in report
    assert report.count("| SaRA @ 5% |") == 3  # Table 1, per font, Table 2
    assert (out / "persistence.png").stat().st_size > 1000 and (out / "tradeoff.png").stat().st_size > 1000
    observations = json.loads((out / "observations.json").read_text())
    assert [row["budget"] for row in observations["zeroing"]] == [0.0, 0.05, 0.2]
    first = observations["persistence"]["points"][0]
    assert first["step"] == 0 and first["newly_small"] == 0 and first["still_small"] == pytest.approx(0.01, rel=1e-3)
    assert report in completed.stdout
    observed = (out / "observations.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 3 and "[1/" not in again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)  # nothing ran twice
    assert (out / "observations.json").stat().st_mtime_ns == observed
