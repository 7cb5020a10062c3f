"""merge / inspect / analyze on real tiny pipelines, single-file checkpoints and trained deltas."""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from single_file import write_single_file_checkpoint
from tiny_sd import tiny_unet, write_tiny_sd_pipeline

from sara_train import SaRAConfig, SparseDelta, inject
from sara_train.cli import build_parser
from sara_train.cli.analyze import analyze_command, unet_probe
from sara_train.cli.inspect import inspect_command
from sara_train.cli.merge import merge_command, parse_delta_spec
from sara_train.engine.analysis import budget_threshold_table, zero_small_weights_effect
from sara_train.engine.errors import DeltaFormatError, DeltaMismatchError, SaRAError
from sara_train.engine.selection import find_targets
from sara_train.families.sd_unet import delta_to_ldm_keys
from sara_train.trainer.base_model import load_base


def parse(*argv: str) -> argparse.Namespace:
    """Parse like ``sara-train <argv>`` does."""
    return build_parser().parse_args([str(a) for a in argv])


def random_delta(unet, seed: int) -> SparseDelta:
    """A real SaRA delta of ``unet`` (diffusers keys): inject, random update, take the delta."""
    handle = inject(unet, SaRAConfig(threshold=2e-3))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(torch.randn(values.shape, generator=generator) * 0.01)
    delta = handle.delta(metadata={"steps": "100", "lr": "1e-4"})
    handle.remove(merge=False)
    return delta


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """An SD1.5 tiny folder, its single-file checkpoint, a delta of its UNet saved in diffusers and
    LDM naming, a second delta, and a delta trained on another SD1.5 (other random weights)."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_tiny_sd_pipeline(root / "sd15", "sd15")
    base = load_base(folder)
    delta = random_delta(base.unet, seed=1)
    other = load_base(write_tiny_sd_pipeline(root / "sd15_other", "sd15", seed=7))
    return {
        "root": root,
        "folder": folder,
        "base": base,
        "delta": delta,
        "file": write_single_file_checkpoint(folder, root / "sd15.safetensors"),
        "diffusers_delta": delta.save(root / "delta_diffusers.safetensors"),
        "ldm_delta": delta_to_ldm_keys(delta, dict(base.unet.config)).save(root / "delta_ldm.safetensors"),
        "second": random_delta(base.unet, seed=2).save(root / "second.safetensors"),
        "foreign": delta_to_ldm_keys(random_delta(other.unet, seed=3), dict(other.unet.config)).save(
            root / "foreign.safetensors"
        ),
    }


def expected_unet(setup, deltas: list[SparseDelta], strengths: list[float]) -> dict[str, torch.Tensor]:
    """The base UNet's state dict with the deltas applied in memory (stacked, as merging does)."""
    state = {key: value.clone() for key, value in setup["base"].unet.state_dict().items()}
    SparseDelta.stack(deltas, strengths).apply_to(state)
    return state


def assert_unet_equals(unet, expected) -> None:
    state = unet.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[key], expected[key]) for key in expected)


@pytest.mark.parametrize("naming", ["ldm_delta", "diffusers_delta"])
def test_merge_into_a_single_file_equals_applying_in_memory(setup, tmp_path, naming, capsys):
    out = tmp_path / "merged.safetensors"
    assert (
        merge_command(
            parse(
                "merge",
                "--base",
                setup["file"],
                "--delta",
                f"{setup[naming]}:0.5",
                "--delta",
                setup["second"],
                "--out",
                out,
            )
        )
        == 0
    )
    assert str(out) in capsys.readouterr().out
    merged = load_base(out, config_dir=setup["folder"])
    second = SparseDelta.load(setup["second"])
    assert_unet_equals(merged.unet, expected_unet(setup, [setup["delta"], second], [0.5, 1.0]))
    before, after = load_file(setup["file"]), load_file(out)
    assert all(torch.equal(before[key], after[key]) for key in before if not key.startswith("model.diffusion_model."))


@pytest.mark.parametrize("naming", ["ldm_delta", "diffusers_delta"])
def test_merge_into_a_diffusers_folder_writes_a_new_complete_folder(setup, tmp_path, naming):
    out = tmp_path / "merged"
    merge_command(parse("merge", "--base", setup["folder"], "--delta", setup[naming], "--out", out))
    assert_unet_equals(load_base(out).unet, expected_unet(setup, [setup["delta"]], [1.0]))
    for relative in (
        "model_index.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "unet/config.json",
    ):
        assert (out / relative).read_bytes() == (setup["folder"] / relative).read_bytes(), relative
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    with pytest.raises(SaRAError, match="already exists"):
        merge_command(parse("merge", "--base", setup["folder"], "--delta", setup[naming], "--out", out))


def test_merge_into_sharded_and_variant_unet_weights(setup, tmp_path):
    """Every copy of the UNet weights is merged: the shards of an index and an fp16 variant."""
    base = shutil.copytree(setup["folder"], tmp_path / "sharded")
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    setup["base"].unet.save_pretrained(base / "unet", max_shard_size="1MB")
    half = {key: value.half() for key, value in setup["base"].unet.state_dict().items()}
    save_file(half, str(base / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    shards = sorted(p.name for p in (base / "unet").glob("*.safetensors"))
    assert len(shards) > 2 and "diffusion_pytorch_model.fp16.safetensors" in shards
    out = tmp_path / "merged"
    merge_command(parse("merge", "--base", base, "--delta", setup["ldm_delta"], "--out", out))
    assert sorted(p.name for p in (out / "unet").glob("*.safetensors")) == shards
    assert_unet_equals(load_base(out).unet, expected_unet(setup, [setup["delta"]], [1.0]))
    setup["delta"].apply_to(half)
    merged_half = load_file(out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(merged_half[key], half[key]) for key in half)


def test_merge_refuses_a_delta_for_another_model(setup, tmp_path):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(DeltaMismatchError, match="another model"):
        merge_command(parse("merge", "--base", setup["file"], "--delta", setup["foreign"], "--out", out))
    with pytest.raises(DeltaMismatchError, match="another model"):
        merge_command(parse("merge", "--base", setup["folder"], "--delta", setup["foreign"], "--out", tmp_path / "f"))
    assert list(tmp_path.iterdir()) == []
    merge_command(
        parse("merge", "--base", setup["file"], "--delta", setup["foreign"], "--out", out, "--no-check-base")
    )
    assert out.is_file()
    sd2 = write_tiny_sd_pipeline(tmp_path / "sd2", "sd2")
    with pytest.raises(DeltaMismatchError, match="shape"):
        merge_command(parse("merge", "--base", sd2, "--delta", setup["ldm_delta"], "--out", tmp_path / "sd2_merged"))


def test_merge_reports_bad_inputs(setup, tmp_path):
    pickle = tmp_path / "delta.pt"
    pickle.write_bytes(b"\x80\x04\x95 pickle")
    with pytest.raises(DeltaFormatError, match="never unpickles"):
        merge_command(parse("merge", "--base", setup["file"], "--delta", pickle, "--out", tmp_path / "o.safetensors"))
    with pytest.raises(DeltaFormatError, match="no such file"):
        merge_command(
            parse(
                "merge",
                "--base",
                setup["file"],
                "--delta",
                tmp_path / "missing.safetensors",
                "--out",
                tmp_path / "o.safetensors",
            )
        )
    with pytest.raises(SaRAError, match="no such file"):
        merge_command(
            parse(
                "merge",
                "--base",
                tmp_path / "missing.safetensors",
                "--delta",
                setup["ldm_delta"],
                "--out",
                tmp_path / "o.safetensors",
            )
        )
    with pytest.raises(SaRAError, match="is the input file"):
        merge_command(parse("merge", "--base", setup["file"], "--delta", setup["ldm_delta"], "--out", setup["file"]))


def test_delta_specs_take_an_optional_strength():
    assert parse_delta_spec("a/b.safetensors:0.25") == (parse_delta_spec("a/b.safetensors")[0], 0.25)
    assert parse_delta_spec("a/b.safetensors")[1] == 1.0
    assert parse_delta_spec("C:\\deltas\\b.safetensors")[1] == 1.0
    assert parse_delta_spec("d.safetensors:-1")[1] == -1.0


def test_inspect_prints_the_summary_and_json(setup, capsys):
    inspect_command(parse("inspect", setup["ldm_delta"]))
    text = capsys.readouterr().out
    ldm = SparseDelta.load(setup["ldm_delta"])
    assert f"{len(ldm.layers)} layers" in text and ldm.base_fingerprint in text
    assert "steps=100" in text and "key naming: ldm" in text and "input_blocks.1.1.proj_in.weight" in text
    inspect_command(parse("inspect", setup["diffusers_delta"], "--json"))
    report = json.loads(capsys.readouterr().out)
    delta = setup["delta"]
    assert report["entries"] == delta.num_entries and report["key_naming"] == "diffusers"
    assert report["base_fingerprint"] == delta.base_fingerprint
    assert report["metadata"] == {"steps": "100", "lr": "1e-4"}
    assert report["selection"]["threshold"] == pytest.approx(2e-3)
    row = next(r for r in report["layers"] if r["key"] == "conv_in.weight")
    assert row["entries"] == delta.layers["conv_in.weight"].numel and row["dtype"] == "float32"
    assert row["fraction"] == pytest.approx(row["entries"] / (32 * 4 * 3 * 3))


def test_zeroing_small_weights_restores_bit_exactly_and_grows_with_the_threshold():
    torch.manual_seed(0)
    unet = tiny_unet("sdxl").eval()
    before = {key: value.clone() for key, value in unet.state_dict().items()}
    config = SaRAConfig()
    weights = [getattr(t.module, t.param_name) for t in find_targets(unet, config)]
    thresholds = [row.threshold for row in budget_threshold_table(weights, [0.01, 0.1, 0.4])]
    run = unet_probe(unet, 1000, 16, 8, seed=0)
    reference = run(unet).detach()
    rows = zero_small_weights_effect(unet, run, thresholds, config)
    assert all(torch.equal(value, before[key]) for key, value in unet.state_dict().items())
    assert torch.equal(run(unet).detach(), reference)
    assert [row.threshold for row in rows] == thresholds
    assert [row.zeroed_fraction for row in rows] == pytest.approx([0.01, 0.1, 0.4], abs=1e-4)
    changes = [row.relative_change for row in rows]
    assert 0 < changes[0] < changes[1] < changes[2]

    def failing(model):
        if failing.calls:
            raise RuntimeError("boom")
        failing.calls += 1
        return run(model)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        zero_small_weights_effect(unet, failing, thresholds, config)
    assert all(torch.equal(value, before[key]) for key, value in unet.state_dict().items())


def test_analyze_writes_histogram_and_tables(setup, tmp_path, capsys):
    out = tmp_path / "analysis"
    analyze_command(
        parse(
            "analyze",
            "--base",
            setup["file"],
            "--base-config",
            setup["folder"],
            "--budgets",
            "0.01,0.2",
            "--out",
            out,
            "--device",
            "cpu",
        )
    )
    printed = capsys.readouterr().out
    assert "Budget -> threshold" in printed and "Sec. 3.1" in printed
    assert Image.open(out / "histogram.png").size == (640, 360)
    assert (out / "report.md").read_text() in printed
    budgets = list(csv.DictReader((out / "budgets.csv").open()))
    zeroing = list(csv.DictReader((out / "zeroing.csv").open()))
    assert [float(r["budget"]) for r in budgets] == [0.01, 0.2]
    assert [r["threshold"] for r in zeroing] == [r["threshold"] for r in budgets]
    assert float(zeroing[0]["relative_change"]) < float(zeroing[1]["relative_change"])
    with pytest.raises(SaRAError, match="budgets must be fractions in \\(0, 1\\]"):
        analyze_command(parse("analyze", "--base", setup["file"], "--budgets", "0.5,2", "--out", out))
