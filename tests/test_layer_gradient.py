"""The selected entries' gradient formed from the layer (``weight_gradient="auto"`` on a CPU): both
ways (sampled product, dense-then-gather) equal autograd's dense weight gradient at the entries, and
training through it equals training with ``weight_gradient="dense"`` to fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sara_train
from sara_train.engine import positions
from sara_train.engine.layer_gradient import (
    LayerGeometry,
    dense_gradient_at,
    layer_geometry,
    sampled_gradient_at,
    sampled_is_faster,
)

LAYERS = {
    "linear, 3-D input": (lambda: nn.Linear(12, 10), (2, 7, 12)),
    "conv 3x3, padded": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 9, 9)),
    "conv 3x1, stride 2, dilation 2": (lambda: nn.Conv2d(3, 5, (3, 1), stride=2, dilation=2), (2, 3, 11, 8)),
    "conv 1x1": (lambda: nn.Conv2d(8, 4, 1), (3, 8, 5, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_both_ways_equal_autograds_weight_gradient_at_the_entries(name: str, density: float) -> None:
    torch.manual_seed(0)
    make_layer, input_shape = LAYERS[name]
    layer = make_layer()
    inputs = torch.randn(input_shape)
    output = layer(inputs)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    shape = tuple(layer.weight.shape)
    flat = torch.randperm(layer.weight.numel())[: max(1, int(density * layer.weight.numel()))].sort().values
    columns, row_starts = positions.compress(flat.to(torch.int32), shape)
    expected = layer.weight.grad.reshape(-1)[flat]
    geometry = layer_geometry(layer, "weight")
    sampled = sampled_gradient_at(geometry, grad_output, inputs, columns, row_starts)
    dense = dense_gradient_at(geometry, grad_output, inputs, columns, row_starts, shape)
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


def test_the_choice_follows_rows_and_density() -> None:
    linear, conv = LayerGeometry("linear"), LayerGeometry("conv2d", (3, 3), (1, 1), (1, 1), (1, 1))
    assert sampled_is_faster(linear, rows=128, density=0.05)  # a low-resolution attention layer
    assert not sampled_is_faster(linear, rows=8192, density=0.05)  # 64x64 latents at the first level
    assert not sampled_is_faster(linear, rows=512, density=0.2)
    assert sampled_is_faster(conv, rows=2 * 8 * 8, density=0.05)  # SD1.5's 8x8 level, batch 2
    assert not sampled_is_faster(conv, rows=2 * 32 * 32, density=0.05)  # its full-resolution level


def test_only_plain_linear_and_single_group_conv2d_take_the_layer_path() -> None:
    assert layer_geometry(nn.Linear(3, 4), "weight") == LayerGeometry("linear")
    assert layer_geometry(nn.Linear(3, 4), "bias") is None
    assert layer_geometry(nn.Conv2d(4, 4, 3, groups=2), "weight") is None
    assert layer_geometry(nn.Conv2d(4, 4, 3, padding="same"), "weight") is None
    assert layer_geometry(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "weight") is None
    assert layer_geometry(nn.Conv1d(4, 4, 3), "weight") is None


class Net(nn.Module):
    """Every layer kind of ``LAYERS`` in one model, with gradient checkpointing around the convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, dilation=2)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda t: self.strided(torch.tanh(self.conv(t))), x, use_reentrant=False)
        return self.head(torch.tanh(self.pointwise(h)).mean(dim=(2, 3)))


def train(weight_gradient: str) -> tuple[sara_train.SparseDelta, list[str]]:
    torch.manual_seed(0)
    model = Net()
    config = sara_train.SaRAConfig(budget=0.2, weight_gradient=weight_gradient)
    optimizer = sara_train.SaRAAdamW(model, lr=1e-2, config=config, rank_weight=1e-3, progressive_at=3)
    generator = torch.Generator().manual_seed(1)
    kinds = []
    for _ in range(5):
        optimizer.zero_grad()
        for _ in range(2):  # gradient accumulation
            x = torch.randn(4, 3, 12, 12, generator=generator)
            kinds.append(type(model.conv(x).grad_fn).__name__)
            model(x).square().mean().backward()
        optimizer.step()
    return optimizer.handle.delta(), kinds


def test_training_through_the_layer_path_equals_dense_training() -> None:
    delta, kinds = train("auto")
    dense_delta, dense_kinds = train("dense")
    assert set(kinds) == {"LayerWeightGradientBackward"}  # the layer formed the entries' gradient...
    assert "LayerWeightGradientBackward" not in dense_kinds  # ...where "dense" lets the layer's own backward
    for name, layer in dense_delta.layers.items():
        assert torch.equal(delta.layers[name].flat_indices, layer.flat_indices), name
        torch.testing.assert_close(delta.layers[name].values, layer.values, rtol=1e-4, atol=1e-6)


def test_off_the_cpu_the_layer_keeps_its_own_weight_gradient() -> None:
    """ "auto" takes the layer path on a CPU only ("meta" stands for an accelerator: shapes, no data)."""
    model = Net()
    sara_train.inject(model, sara_train.SaRAConfig(budget=0.2))
    model.to("meta")
    output = model.conv(torch.randn(1, 3, 6, 6, device="meta"))
    assert output.requires_grad and type(output.grad_fn).__name__ != "LayerWeightGradientBackward"


def test_weight_gradient_must_be_known() -> None:
    with pytest.raises(sara_train.SaRAError, match="weight_gradient must be one of"):
        sara_train.SaRAConfig(weight_gradient="sparse")
