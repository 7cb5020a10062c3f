"""The one delta path's placement rules, with a toy model family whose attention is split (to_q, to_k,
to_v) in one naming and fused (qkv, stacked along the first dimension) in the other: indices are
remapped, not just renamed, in both directions, and applying either way gives the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sara_train
from sara_train.engine import apply
from sara_train.engine.apply import Piece, Placement, Shapes, fit_delta, whole

WIDTH = 6


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.proj = nn.Linear(WIDTH, WIDTH)


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)


class ToyNaming:
    """Split ``to_q/to_k/to_v`` <-> fused ``qkv`` (weights and biases), ``proj`` unchanged."""

    description = "toy attention naming"
    PARTS = ("to_q", "to_k", "to_v")

    def place(self, delta: Shapes, target: Shapes) -> dict[str, Placement] | None:
        if all(key in target for key in delta):
            return None
        placed = {}
        for key, shape in delta.items():
            module, _, param = key.rpartition(".")
            if module in self.PARTS and f"qkv.{param}" in target:  # split -> fused
                offset = self.PARTS.index(module) * WIDTH
                placed[key] = (Piece(f"qkv.{param}", 0, WIDTH, offset),)
            elif module == "qkv" and f"to_q.{param}" in target:  # fused -> split
                placed[key] = tuple(
                    Piece(f"{part}.{param}", i * WIDTH, (i + 1) * WIDTH, 0) for i, part in enumerate(self.PARTS)
                )
            elif key in target:
                placed[key] = whole(key, shape)
            else:
                return None
        return placed


@pytest.fixture
def toy_naming(monkeypatch):
    naming = ToyNaming()
    monkeypatch.setattr(apply, "KEY_NAMINGS", [*apply.KEY_NAMINGS, naming])
    return naming


def twins() -> tuple[Split, Fused]:
    """The same weights in both layouts."""
    torch.manual_seed(0)
    split, fused = Split(), Fused()
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([split.to_q.weight, split.to_k.weight, split.to_v.weight]))
        fused.qkv.bias.copy_(torch.cat([split.to_q.bias, split.to_k.bias, split.to_v.bias]))
        fused.proj.load_state_dict(split.proj.state_dict())
    return split, fused


def trained_delta(model: nn.Module) -> sara_train.SparseDelta:
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.3, include_bias=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(torch.randn(values.shape, generator=generator))
    delta = handle.delta()
    handle.remove(merge=False)
    return delta


def as_split(fused_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"proj.weight": fused_state["proj.weight"], "proj.bias": fused_state["proj.bias"]}
    for i, part in enumerate(ToyNaming.PARTS):
        out[f"{part}.weight"] = fused_state["qkv.weight"][i * WIDTH : (i + 1) * WIDTH]
        out[f"{part}.bias"] = fused_state["qkv.bias"][i * WIDTH : (i + 1) * WIDTH]
    return out


@pytest.mark.parametrize("trained_on", ["split", "fused"])
def test_a_delta_applies_to_either_layout_with_the_same_result(toy_naming, trained_on: str) -> None:
    split, fused = twins()
    delta = trained_delta(split if trained_on == "split" else fused)
    delta.apply_to(split)
    delta.apply_to(fused)  # base check included: the probes are remapped with the indices
    expected = split.state_dict()
    for key, tensor in as_split(fused.state_dict()).items():
        assert torch.equal(tensor, expected[key]), key


def test_fused_placement_moves_indices_into_their_rows(toy_naming) -> None:
    split, fused = twins()
    delta = trained_delta(split)
    fitted = fit_delta(delta, {k: tuple(v.shape) for k, v in fused.state_dict().items()})
    assert set(fitted.layers) <= {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    qkv = fitted.layers["qkv.weight"]
    assert qkv.shape == (3 * WIDTH, WIDTH)
    expected = torch.cat(
        [
            delta.layers[f"{part}.weight"].flat_indices.long() + i * WIDTH * WIDTH
            for i, part in enumerate(ToyNaming.PARTS)
            if f"{part}.weight" in delta.layers
        ]
    )
    assert torch.equal(qkv.flat_indices.long(), expected.sort().values)
    assert fitted.num_entries == delta.num_entries


def test_layers_that_would_overlap_are_refused(toy_naming) -> None:
    """A delta holding both the fused tensor and one of its parts writes some entries twice."""
    split, fused = twins()
    from_fused, from_split = trained_delta(fused), trained_delta(split)
    both = sara_train.SparseDelta({**from_fused.layers, "to_q.weight": from_split.layers["to_q.weight"]})
    with pytest.raises(sara_train.DeltaMismatchError, match="two layers of the delta write the same entries"):
        fit_delta(both, {k: tuple(v.shape) for k, v in split.state_dict().items()})


def test_without_the_naming_the_layouts_do_not_fit() -> None:
    split, fused = twins()
    with pytest.raises(sara_train.DeltaMismatchError, match="not in the target"):
        trained_delta(split).apply_to(fused)
