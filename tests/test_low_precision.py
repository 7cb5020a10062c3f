"""Weights stored in fp8 (or bf16): selection is exact despite signed zeros and ties, and in the overlay
mode training never writes the stored weights while the update and its gradient stay exact in the
compute dtype (the same numbers a dense fp32 copy of the fp8 weights gives)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sara_train
from sara_train.engine.selection import select_entries

FP8 = torch.float8_e4m3fn


class CastLinear(nn.Linear):
    """A Linear whose stored weight may be low precision: cast to the input's dtype per forward (what
    ComfyUI's manual-cast layers do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def fp8_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(CastLinear(16, 32), nn.GELU(), CastLinear(32, 8))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(0.02)  # many entries round to exact (signed) zeros in fp8
            layer.weight.data = layer.weight.data.to(FP8)
    return model


def test_budget_selection_on_fp8_is_exact_with_signed_zeros_and_ties() -> None:
    model = fp8_model()
    weights = {"a": model[0].weight, "b": model[2].weight}
    assert (weights["a"].float() == 0).sum() > 30 and (weights["a"].view(torch.uint8) == 0x80).any()  # -0.0 stored
    for budget in (10, 100, 0.3):
        threshold, selected = select_entries(weights, sara_train.SaRAConfig(budget=budget))
        count = sum(len(v) for v in selected.values())
        total = sum(w.numel() for w in weights.values())
        assert count == (budget if isinstance(budget, int) else round(budget * total))
        chosen = torch.cat([weights[k].float().reshape(-1)[v.long()].abs() for k, v in selected.items()])
        others = torch.cat(
            [
                weights[k]
                .float()
                .reshape(-1)[[i for i in range(weights[k].numel()) if i not in set(v.tolist())]]
                .abs()
                for k, v in selected.items()
            ]
        )
        assert chosen.max() <= others.min() and (chosen < threshold).all()


def test_overlay_training_keeps_the_fp8_weights_and_is_exact() -> None:
    model = fp8_model()
    stored = [layer.weight.clone() for layer in (model[0], model[2])]
    reference = copy.deepcopy(model)  # the same network with fp32 weights holding the fp8 values
    for layer in (reference[0], reference[2]):
        layer.weight.data = layer.weight.data.float()
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.2, overlay_dtype=torch.float32))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 16, generator=generator), torch.randn(5, 8, generator=generator)
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    for name, update in handle.layers.items():
        dense_grad = reference.get_parameter(name).grad.reshape(-1)[update.flat_indices.long()]
        assert torch.equal(update.values.grad, dense_grad), name  # not rounded to fp8 on the way

    optimizer = torch.optim.SGD(handle.parameters(), lr=1e-3)
    optimizer.step()
    originals = [layer.parametrizations.weight.original for layer in (model[0], model[2])]
    assert all(
        original.dtype == FP8 and torch.equal(original.view(torch.uint8), before.view(torch.uint8))
        for original, before in zip(originals, stored, strict=True)
    )  # storage never written
    delta = handle.delta()
    for name, update in handle.layers.items():
        expected = update.values.detach() - update.base_values.float()
        assert torch.equal(delta.layers[name].values, expected)
        assert expected.abs().max() < 0.01  # updates far below fp8 resolution survive
    with torch.no_grad():  # the forward uses exactly base + update in fp32
        merged = copy.deepcopy(reference)
        delta.apply_to(
            {
                k.replace("parametrizations.weight.original", "weight"): v
                for k, v in merged.state_dict(keep_vars=True).items()
            }
        )
        torch.testing.assert_close(model(x), merged(x), rtol=0, atol=0)


def test_overlay_in_fp32_equals_the_in_place_mode(batch) -> None:
    from conftest import TinyNet

    torch.manual_seed(0)
    in_place, overlay = TinyNet(), TinyNet()
    overlay.load_state_dict(in_place.state_dict())
    handles = [
        sara_train.inject(in_place, sara_train.SaRAConfig(budget=0.2)),
        sara_train.inject(overlay, sara_train.SaRAConfig(budget=0.2, overlay_dtype=torch.float32)),
    ]
    optimizers = [torch.optim.Adam(h.parameters(), lr=1e-2) for h in handles]
    for _ in range(3):
        for model, optimizer in zip((in_place, overlay), optimizers, strict=True):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
            optimizer.step()
    for name in handles[0].layers:
        assert torch.equal(handles[0].layers[name].values, handles[1].layers[name].values)
    handles[1].reselect()
    assert handles[1].num_trainable <= handles[0].num_trainable


@pytest.mark.parametrize("merge", [True, False])
def test_removing_an_overlay_merges_or_leaves_the_storage(merge: bool) -> None:
    model = fp8_model()
    stored = model[0].weight.clone()
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.2, overlay_dtype=torch.float32))
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(0.5)
    handle.remove(merge=merge)
    assert model[0].weight.dtype == FP8
    changed = not torch.equal(model[0].weight.view(torch.uint8), stored.view(torch.uint8))
    assert changed == merge
