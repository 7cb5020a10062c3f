"""The SaRA Train node's input handling. ``nodes/train_data.py`` needs only torch, so it is loaded
by path here, without ``nodes/__init__.py`` (which needs a running ComfyUI)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("train_data", Path(__file__).parent.parent / "nodes" / "train_data.py")
train_data = sys.modules["train_data"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_data)
build_training_set = train_data.build_training_set


def conditioning(value: float = 0.0) -> list:
    return [[torch.full((1, 77, 8), value), {"pooled_output": torch.zeros(1, 8)}]]


def test_one_batch_with_a_shared_conditioning_is_one_bucket() -> None:
    latents = torch.randn(3, 4, 8, 8)
    data = build_training_set([{"samples": latents}], [conditioning()])
    assert data.num_images == 3 and len(data.buckets) == 1
    assert torch.equal(data.buckets[0].latents, latents)
    assert data.buckets[0].conditioning_ids == [0, 0, 0]


def test_a_list_of_sizes_is_grouped_into_buckets_keeping_per_image_conditioning() -> None:
    latents = [
        {"samples": torch.randn(1, 4, 8, 8)},
        {"samples": torch.randn(2, 4, 8, 12)},
        {"samples": torch.randn(1, 4, 8, 8)},
    ]
    conds = [conditioning(float(i)) for i in range(4)]
    data = build_training_set(latents, conds)
    assert [tuple(b.latents.shape) for b in data.buckets] == [(2, 4, 8, 8), (2, 4, 8, 12)]
    assert data.buckets[0].conditioning_ids == [0, 3] and data.buckets[1].conditioning_ids == [1, 2]
    assert torch.equal(data.buckets[0].latents[1], latents[2]["samples"][0])


def test_one_conditioning_with_an_entry_per_image_is_split_per_image() -> None:
    combined = conditioning(1.0) + conditioning(2.0)
    data = build_training_set([{"samples": torch.randn(2, 4, 8, 8)}], [combined])
    assert len(data.conditionings) == 2 and data.buckets[0].conditioning_ids == [0, 1]
    shared = build_training_set([{"samples": torch.randn(3, 4, 8, 8)}], [combined])
    assert len(shared.conditionings) == 1 and shared.buckets[0].conditioning_ids == [0, 0, 0]


@pytest.mark.parametrize(
    "latents, conds, message",
    [
        ([{"samples": torch.zeros(2, 4, 8, 8)}], [conditioning()], "all zeros"),
        ([{"samples": torch.full((1, 4, 8, 8), float("nan"))}], [conditioning()], "latent 1 contains NaN"),
        ([{"samples": torch.randn(1, 4, 8, 8)}], [conditioning(float("nan"))], "conditioning 1 contains NaN"),
        ([{"samples": torch.randn(3, 4, 8, 8)}], [conditioning(), conditioning()], "2 conditionings for 3"),
        ([{"samples": torch.randn(0, 4, 8, 8)}], [conditioning()], "empty"),
        ([{"samples": torch.randn(4, 8)}], [conditioning()], "not a LATENT"),
        ([{"samples": torch.randn(1, 4, 8, 8)}], [[]], "conditioning 1 is empty"),
    ],
)
def test_bad_inputs_name_the_problem(latents, conds, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_training_set(latents, conds)


def test_dropped_captions_train_with_the_given_conditioning_or_the_first_zeroed() -> None:
    latents = [{"samples": torch.randn(2, 4, 8, 8)}]
    first = [[torch.full((1, 77, 8), 2.0), {"pooled_output": torch.ones(1, 8), "width": 64}]]
    data = build_training_set(latents, [first, conditioning(3.0)])
    [(tensor, extras)] = data.dropout_conditioning
    assert tensor.shape == (1, 77, 8) and not tensor.any() and not extras["pooled_output"].any()
    assert extras["width"] == 64 and first[0][1]["pooled_output"].all()  # the input is not changed
    empty = conditioning(0.5)
    assert build_training_set(latents, [first], empty).dropout_conditioning is empty
    with pytest.raises(ValueError, match="conditioning dropout contains NaN"):
        build_training_set(latents, [first], conditioning(float("nan")))
