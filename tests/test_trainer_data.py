"""The training folder (``sara_train.trainer.data``) and the encoded-example cache
(``sara_train.trainer.cache``), on real image files written by PIL and real (tiny) encoders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sara_train.engine.errors import SaRAError
from sara_train.trainer.cache import build_examples
from sara_train.trainer.data import DatasetItem, load_image, scan_dataset, validate_images, with_prefix
from sara_train.trainer.types import PromptEmbedding


def write_image(path: Path, width: int = 24, height: int = 24, mode: str = "RGB", seed: int = 0) -> Path:
    """A noise image (so every crop and mirror differs) saved by PIL in the format its suffix names."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def write_dataset(folder: Path, captions: dict[str, str], width: int = 24, height: int = 24) -> list[DatasetItem]:
    """``name.png`` + ``name.txt`` for each entry; returns the scanned folder."""
    for seed, (name, caption) in enumerate(captions.items()):
        write_image(folder / f"{name}.png", width, height, seed=seed)
        (folder / f"{name}.txt").write_text(caption)
    return scan_dataset(folder)


# -- scanning the folder ------------------------------------------------------------------------


def test_caption_files_are_paired_by_stem_sorted_by_name_with_the_prefix(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.webp"):
        write_image(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"  photo of {name[0]}\n")
    write_image(tmp_path / "._a.png")  # macOS resource fork: hidden, skipped
    write_image(tmp_path / "sub" / "d.png")  # subfolders are not scanned
    (tmp_path / "notes.md").write_text("not an image")
    items = scan_dataset(tmp_path, caption_prefix="sks")
    assert [item.image_path.name for item in items] == ["a.JPG", "b.png", "c.webp"]
    assert [item.caption for item in items] == ["sks, photo of a", "sks, photo of b", "sks, photo of c"]
    assert scan_dataset(tmp_path)[0] == DatasetItem(tmp_path / "a.JPG", "photo of a")


def test_a_custom_caption_extension_and_an_empty_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "a.caption").write_text("a cat")
    (tmp_path / "b.caption").write_text("")
    assert [item.caption for item in scan_dataset(tmp_path, caption_extension="caption")] == ["a cat", ""]
    assert [item.caption for item in scan_dataset(tmp_path, "sks", ".caption")] == ["sks, a cat", "sks"]


@pytest.mark.parametrize(
    "prefix, caption, joined",
    [
        ("sks", "a dog", "sks, a dog"),
        ("sks", "", "sks"),
        ("", "a dog", "a dog"),
        (" sks ", " a dog ", "sks, a dog"),
        ("", "", ""),
    ],
)
def test_with_prefix(prefix: str, caption: str, joined: str) -> None:
    assert with_prefix(prefix, caption) == joined


def test_metadata_jsonl_wins_over_caption_files_and_keeps_its_order(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "sub" / "a.jpg")
    (tmp_path / "b.txt").write_text("ignored")
    lines = [{"file_name": "b.png", "text": "second letter"}, {"file_name": "sub/a.jpg", "caption": "first"}]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    items = scan_dataset(tmp_path, caption_prefix="sks")
    assert items == [
        DatasetItem(tmp_path / "b.png", "sks, second letter"),
        DatasetItem(tmp_path / "sub" / "a.jpg", "sks, first"),
    ]


def test_a_missing_folder_or_a_file_given_as_folder(tmp_path: Path) -> None:
    with pytest.raises(SaRAError, match=f"{tmp_path / 'nope'} does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(SaRAError, match=f"{tmp_path / 'file.png'} is not a folder"):
        scan_dataset(tmp_path / "file.png")


def test_a_folder_without_images_says_what_it_holds(tmp_path: Path) -> None:
    with pytest.raises(SaRAError, match=f"{tmp_path} is empty"):
        scan_dataset(tmp_path)
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "photo.tiff").write_bytes(b"x")
    write_image(tmp_path / "nested" / "a.png")
    with pytest.raises(
        SaRAError,
        match=rf"no training images .* in {tmp_path} .*3 other entries: "
        r"nested/, photo.tiff, readme.md",
    ):
        scan_dataset(tmp_path)


def test_images_without_captions_are_named_with_the_expected_file(tmp_path: Path) -> None:
    for index in range(8):
        write_image(tmp_path / f"img{index}.png")
    (tmp_path / "img0.txt").write_text("has one")
    with pytest.raises(SaRAError) as error:
        scan_dataset(tmp_path)
    message = str(error.value)
    assert f"training image {tmp_path / 'img1.png'} has no caption file: expected {tmp_path / 'img1.txt'}" in message
    assert "6 more images lack one too: img2.png, img3.png, img4.png, img5.png, img6.png and 1 more" in message


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"file_name": "a.png", "text": "ok"}', '{"file_name": "a.png" "text"}'],
            r"metadata.jsonl line 2 is not valid JSON",
        ),
        (['{"file_name": "gone.png", "text": "x"}'], r"metadata.jsonl line 1 names .*gone.png, which does not exist"),
        (['{"file_name": "a.png"}'], r'metadata.jsonl line 1 \(a.png\) has no "text" \(or "caption"\) string'),
        (['["a.png", "x"]'], r'metadata.jsonl line 1 must be a JSON object with a "file_name" string'),
        (
            ['{"file_name": "a.png", "text": "x"}', '{"file_name": "a.png", "text": "y"}'],
            r"metadata.jsonl line 2 lists .*a.png a second time",
        ),
        ([""], r"metadata.jsonl lists no images"),
    ],
)
def test_bad_metadata_jsonl_names_the_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(SaRAError, match=message) as error:
        scan_dataset(tmp_path)
    assert str(tmp_path / "metadata.jsonl") in str(error.value)


# -- reading images -----------------------------------------------------------------------------


def test_unreadable_images_are_all_reported_together(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    truncated = write_image(tmp_path / "truncated.png", 64, 64)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    items = [DatasetItem(path, "") for path in (good, garbage, truncated)]
    with pytest.raises(SaRAError) as error:
        validate_images(items)
    message = str(error.value)
    assert message.startswith("2 of 3 training images cannot be read")
    assert f"{garbage} cannot be read: cannot identify image file" in message
    assert f"{truncated} cannot be read:" in message and "truncated" in message
    assert "good.png" not in message
    with pytest.raises(SaRAError, match=f"training image {garbage} cannot be read"):
        load_image(garbage, 16)


def test_transparency_is_white_and_grayscale_becomes_rgb(tmp_path: Path) -> None:
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(clear)
    gray_alpha = tmp_path / "la.png"
    Image.new("LA", (16, 16), (0, 0)).save(gray_alpha)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(tmp_path / "palette.png", transparency=0)
    for path in (clear, gray_alpha, tmp_path / "palette.png"):
        pixels = load_image(path, 16).pixels
        assert pixels.shape == (3, 16, 16) and torch.equal(pixels, torch.ones(3, 16, 16)), path
    gray = write_image(tmp_path / "gray.png", mode="L")
    pixels = load_image(gray, 24).pixels
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    expected = torch.from_numpy(np.asarray(Image.open(gray), dtype=np.float32)) / 127.5 - 1
    assert torch.equal(pixels[0], expected)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (32, 16), "red").save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg", 16).original_size == (32, 16)


def test_center_crop_of_the_resized_image(tmp_path: Path) -> None:
    path = write_image(tmp_path / "wide.png", width=40, height=24)
    view = load_image(path, 16)
    assert view.original_size == (24, 40) and view.crop_top_left == (0, 5)  # resized to 27 x 16
    resized = Image.open(path).resize((27, 16), Image.Resampling.LANCZOS).crop((5, 0, 21, 16))
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(view.pixels, expected)
    assert view.pixels.min() >= -1 and view.pixels.max() <= 1


def test_random_crop_is_reproducible_with_its_generator(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.png", width=64, height=48)

    def corners(seed: int) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(seed)
        return [load_image(path, 16, "random", generator=generator).crop_top_left for _ in range(6)]

    assert corners(1) == corners(1)
    assert corners(1) != corners(2)
    assert all(y == 0 and 0 <= x <= 21 - 16 for y, x in corners(3))  # resized to 21 x 16
    assert len(set(corners(1))) > 1


def test_flip_mirrors_the_same_crop(tmp_path: Path) -> None:
    path = write_image(tmp_path / "wide.png", width=40, height=24)
    plain = load_image(path, 16, "random", generator=torch.Generator().manual_seed(4))
    mirrored = load_image(path, 16, "random", flip=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mirrored.pixels, plain.pixels.flip(-1))
    assert not torch.equal(mirrored.pixels, plain.pixels)
    assert mirrored.crop_top_left == (plain.crop_top_left[0], 27 - plain.crop_top_left[1] - 16)


@pytest.mark.parametrize(
    "resolution, crop, message",
    [
        (20, "center", "resolution must be a positive multiple of 8 .* got 20"),
        (0, "center", "resolution must be a positive multiple of 8"),
        (16, "top", "crop must be one of center, random, got 'top'"),
    ],
)
def test_bad_image_options(tmp_path: Path, resolution: int, crop: str, message: str) -> None:
    with pytest.raises(SaRAError, match=message):
        load_image(write_image(tmp_path / "a.png"), resolution, crop)


# -- the encoded-example cache ------------------------------------------------------------------


class ImageEncoder:
    """A real (tiny) 'VAE': 8x8 average pooling, [B, 3, R, R] -> [B, 3, R/8, R/8]; records batches."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.batches.append(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8) * 0.5

    @property
    def views(self) -> int:
        return sum(len(batch) for batch in self.batches)


class PromptEncoder:
    """A real (tiny) text encoder: character codes -> hidden_states [8, 4], pooled [4]; records calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, captions: list[str]) -> list[PromptEmbedding]:
        self.calls.append(list(captions))
        embeddings = []
        for caption in captions:
            codes = torch.tensor([float(ord(c)) for c in caption.ljust(32)[:32]]).reshape(8, 4) / 128
            embeddings.append(PromptEmbedding(codes, codes.mean(0)))
        return embeddings

    @property
    def captions(self) -> list[str]:
        return [caption for call in self.calls for caption in call]


def encode(items: list[DatasetItem], cache_dir: Path | None, fingerprint: str = "model-a", **options):
    """``build_examples`` with fresh counting encoders: ``(examples, image encoder, prompt encoder)``."""
    images, prompts = ImageEncoder(), PromptEncoder()
    settings = {"resolution": 16, "crop": "center", "flip": False, "random_crop_variants": 1, "progress": False}
    examples = build_examples(
        items,
        encode_images=images,
        encode_prompts=prompts,
        model_fingerprint=fingerprint,
        cache_dir=cache_dir,
        **(settings | options),
    )
    return examples, images, prompts


def assert_identical(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.latents, b.latents) and a.latents.dtype == b.latents.dtype
        assert torch.equal(a.prompt.hidden_states, b.prompt.hidden_states)
        assert torch.equal(a.prompt.pooled, b.prompt.pooled)
        assert (a.time_ids is None and b.time_ids is None) or torch.equal(a.time_ids, b.time_ids)


def test_a_second_run_reads_everything_back_bit_identical(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green", "c": "red"})
    first, images, prompts = encode(items, tmp_path / "cache", flip=True, with_time_ids=True)
    assert images.views == 6 and prompts.captions == ["red", "green"]  # one caption, encoded once
    assert first[0].prompt is first[4].prompt
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    second, images, prompts = encode(items, tmp_path / "cache", flip=True, with_time_ids=True)
    assert images.batches == [] and prompts.calls == []
    assert_identical(first, second)


def test_memory_only_without_a_cache_dir(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red"})
    first, _, _ = encode(items, None)
    second, images, _ = encode(items, None)
    assert images.views == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert_identical(first, second)


def test_latents_are_the_encoded_center_crop(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red"}, width=40, height=24)
    [example], _, _ = encode(items, None)
    expected = torch.nn.functional.avg_pool2d(load_image(items[0].image_path, 16).pixels[None], 8)[0] * 0.5
    assert example.latents.shape == (3, 2, 2) and torch.equal(example.latents, expected)
    assert example.time_ids is None and torch.equal(
        example.prompt.hidden_states, PromptEncoder()(["red"])[0].hidden_states
    )


def test_encoders_run_in_batches_that_span_images(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"})
    _, images, prompts = encode(items, None, flip=True, batch_size=4)
    assert [len(batch) for batch in images.batches] == [4, 4, 2]
    assert prompts.calls == [["1", "2", "3", "4"], ["5"]]


def test_a_changed_caption_or_image_re_encodes_only_that_image(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green", "c": "blue"})
    first, _, _ = encode(items, tmp_path / "cache")
    (tmp_path / "data" / "b.txt").write_text("yellow")
    changed, images, prompts = encode(scan_dataset(tmp_path / "data"), tmp_path / "cache")
    assert images.views == 1 and prompts.captions == ["yellow"]
    assert torch.equal(changed[1].latents, first[1].latents)
    write_image(tmp_path / "data" / "c.png", seed=99)
    changed, images, prompts = encode(scan_dataset(tmp_path / "data"), tmp_path / "cache")
    assert images.views == 1 and prompts.captions == ["blue"]
    assert torch.equal(images.batches[0][0], load_image(tmp_path / "data" / "c.png", 16).pixels)
    assert not torch.equal(changed[2].latents, first[2].latents)
    assert torch.equal(changed[0].latents, first[0].latents)


@pytest.mark.parametrize(
    "change", [{"fingerprint": "model-b"}, {"resolution": 24}, {"flip": True}, {"crop": "random"}]
)
def test_a_changed_model_or_view_option_re_encodes_everything(tmp_path: Path, change: dict) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green"})
    encode(items, tmp_path / "cache")
    _, images, prompts = encode(items, tmp_path / "cache", **change)
    assert images.views >= 2 and prompts.captions == ["red", "green"]


def test_random_crops_are_fixed_per_seed_and_cached(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green"}, width=64, height=32)
    first, images, _ = encode(
        items, tmp_path / "cache", crop="random", random_crop_variants=3, flip=True, with_time_ids=True
    )
    assert len(first) == 12 and images.views == 12
    corners = [tuple(example.time_ids[2:4].tolist()) for example in first[:6]]
    assert len(set(corners[0::2])) > 1  # three crops, not all the same
    for plain, mirrored in zip(first[0::2], first[1::2]):
        assert torch.allclose(mirrored.latents, plain.latents.flip(-1))  # pooling sums in another order
        assert mirrored.time_ids[3] == 32 - plain.time_ids[3] - 16
    again, images, _ = encode(
        items, tmp_path / "cache", crop="random", random_crop_variants=3, flip=True, with_time_ids=True
    )
    assert images.views == 0
    assert_identical(first, again)
    other_seed, images, _ = encode(
        items, tmp_path / "cache", crop="random", random_crop_variants=3, flip=True, with_time_ids=True, seed=1
    )
    assert images.views == 12
    assert [e.time_ids.tolist() for e in other_seed] != [e.time_ids.tolist() for e in first]


def test_time_ids_hold_the_original_size_and_crop_corner(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red"}, width=40, height=24)
    examples, _, _ = encode(items, None, flip=True, with_time_ids=True)
    assert [example.time_ids.tolist() for example in examples] == [[24, 40, 0, 5, 16, 16], [24, 40, 0, 6, 16, 16]]
    assert examples[0].time_ids.dtype == torch.float32 and examples[0].time_ids.shape == (6,)


def test_a_corrupt_cache_file_is_re_encoded_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green"})
    first, _, _ = encode(items, tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    truncated = files[0]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    files[1].write_bytes(b"\x80\x04garbage, a pickle header")
    with caplog.at_level(logging.WARNING, logger="sara_train.trainer.cache"):
        second, images, _ = encode(items, tmp_path / "cache")
    assert images.views == 2
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("encoding its image again" in warning for warning in warnings)
    assert any(f"cache file {truncated} cannot be used" in warning and "truncated" in warning for warning in warnings)
    assert_identical(first, second)
    caplog.clear()
    _, images, _ = encode(items, tmp_path / "cache")
    assert images.views == 0 and not caplog.records


def test_bad_images_fail_before_anything_is_encoded(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green", "c": "blue"})
    items[0].image_path.write_bytes(b"garbage")
    items[2].image_path.write_bytes(items[2].image_path.read_bytes()[:100])
    images, prompts = ImageEncoder(), PromptEncoder()
    with pytest.raises(SaRAError, match="2 of 2 training images cannot be read") as error:
        build_examples(
            items[:1] + items[2:],
            resolution=16,
            crop="center",
            flip=False,
            random_crop_variants=1,
            encode_images=images,
            encode_prompts=prompts,
            model_fingerprint="m",
            cache_dir=None,
            progress=False,
        )
    assert "a.png" in str(error.value) and "c.png" in str(error.value)
    assert images.batches == [] and prompts.calls == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"random_crop_variants": 0, "crop": "random"}, "random_crop_variants must be at least 1"),
        ({"resolution": 12}, "resolution must be a positive multiple of 8"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_build_options(tmp_path: Path, options: dict, message: str) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red"})
    with pytest.raises(SaRAError, match=message):
        encode(items, None, **options)


def test_an_encoder_returning_the_wrong_batch_is_named(tmp_path: Path) -> None:
    items = write_dataset(tmp_path / "data", {"a": "red", "b": "green"})
    with pytest.raises(SaRAError, match=r"encode_images returned \(1, 3, 2, 2\) for a batch of 2 images"):
        build_examples(
            items,
            resolution=16,
            crop="center",
            flip=False,
            random_crop_variants=1,
            encode_images=lambda pixels: torch.nn.functional.avg_pool2d(pixels[:1], 8),
            encode_prompts=PromptEncoder(),
            model_fingerprint="m",
            cache_dir=None,
            progress=False,
        )
