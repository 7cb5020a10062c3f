"""Aspect-ratio buckets: the bucket sizes, images cut to the nearest one with their aspect ratio kept,
batches of one size that still visit every example each epoch, and the CLI training SD1.5 and Flux on
a folder of wide, tall and square images without square crops."""

from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tiny_dit import write_tiny_flux_pipeline
from train_cli import read_delta, sara_train_cli, train_args

from sara_train.engine.errors import SaRAError
from sara_train.trainer.data import ResizePlan, bucket_sizes, load_image_variants, nearest_bucket
from sara_train.trainer.loop import bucketed_batch


def test_bucket_sizes_cover_1_2_to_2_1_at_the_resolutions_area() -> None:
    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (1344, 768) in sizes and (768, 1344) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.5 <= width / height <= 2 and width * height <= 1024**2
        assert width * height > 0.8 * 1024**2  # about the resolution's area
    with pytest.raises(SaRAError, match="multiple of 8 that divides the resolution 1024"):
        bucket_sizes(1024, 60)


def test_an_image_takes_the_nearest_bucket_with_its_aspect_ratio_kept(tmp_path: Path) -> None:
    assert nearest_bucket(1920, 1080, bucket_sizes(1024, 64)) == (1344, 768)  # 16:9 -> 1.75
    assert nearest_bucket(1000, 1000, bucket_sizes(1024, 64)) == (1024, 1024)
    assert nearest_bucket(64, 32, bucket_sizes(32, 8)) == (40, 24)
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (64, 32), "blue")
    ImageDraw.Draw(image).rectangle([0, 0, 31, 31], fill="red")  # left half red
    image.save(path)
    plan = ResizePlan.for_image(image, (40, 24))
    assert plan.resized == (48, 24)  # covers the bucket, 2:1 kept (no squashing)
    (view,) = load_image_variants(path, 32, "center", 1, False, bucket_step=8)
    assert view.pixels.shape == (3, 24, 40) and view.crop_top_left == (0, 4)
    red = view.pixels[0].mean(0)  # per column: +1 red, -1 blue
    assert red[:18].min() > 0.9 and red[-18:].max() < -0.9  # the halves stay halves: 20 px of each, 4 cut per side
    (mirror,) = load_image_variants(path, 32, "center", 1, False, bucket_step=0)
    assert mirror.pixels.shape == (3, 32, 32)  # no buckets: the square crop


def test_bucketed_batches_hold_one_size_and_visit_every_example_each_epoch() -> None:
    groups = [[0, 2, 4, 6, 8], [1, 3], [5, 7, 9]]
    per_epoch = 3 + 1 + 2  # ceil(5/2) + ceil(2/2) + ceil(3/2)
    epoch = [bucketed_batch(position, groups, 2, seed=3) for position in range(per_epoch)]
    assert all(len(batch) == 2 and any(set(batch) <= set(group) for group in groups) for batch in epoch)
    assert set().union(*map(set, epoch)) == set(range(10))
    assert epoch == [bucketed_batch(position, groups, 2, seed=3) for position in range(per_epoch)]  # seeded
    next_epoch = [bucketed_batch(per_epoch + position, groups, 2, seed=3) for position in range(per_epoch)]
    assert next_epoch != epoch and set().union(*map(set, next_epoch)) == set(range(10))


def write_mixed_folder(folder: Path) -> Path:
    folder.mkdir()
    for name, size, color in [("wide", (64, 32), "red"), ("tall", (32, 64), "blue"), ("square", (40, 40), "green")]:
        for i in range(2):
            image = Image.new("RGB", size, "gray")
            ImageDraw.Draw(image).ellipse([2 + i, 2, size[0] - 3, size[1] - 3], fill=color)
            image.save(folder / f"{name}_{i}.png")
            (folder / f"{name}_{i}.txt").write_text(f"a {color} {name} disc")
    return folder


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_cli_trains_on_buckets(family: str, tiny_base: Path, tmp_path: Path) -> None:
    """Mixed sizes, no square crops: each image cached at its bucket's latent size (VAE factor 2),
    batches of 2 drawn per bucket, the delta trained."""
    data = write_mixed_folder(tmp_path / "data")
    base = tiny_base if family == "sd1" else write_tiny_flux_pipeline(tmp_path / "flux")
    out = tmp_path / "run"
    extra = ("--bucket-step", "8", "--steps", "3") + (("--text-tokens", "16") if family == "flux" else ())
    result = sara_train_cli(*train_args(base, data, out, *extra))
    assert result.returncode == 0, result.stderr
    shapes = sorted(
        tuple(load_file(path)["latents"].shape[-2:]) for path in (tmp_path / "cache").glob("*.safetensors")
    )
    assert shapes == [(12, 20)] * 2 + [(16, 16)] * 2 + [(20, 12)] * 2  # wide 40x24, square, tall 24x40
    assert read_delta(out / "sara_delta.safetensors").metadata["steps"] == "3"
    refused = sara_train_cli(*train_args(base, data, tmp_path / "bad", "--bucket-step", "12"))
    assert refused.returncode == 2 and "--bucket-step must be 0 or a multiple of 8" in refused.stderr
