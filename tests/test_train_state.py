"""Resuming a SaRAAdamW from saved state continues bit-identically, across a progressive step."""
import pytest
import torch
from conftest import TinyNet
from safetensors.torch import load_file, save_file
from torch import nn

import sara_train
from sara_train.errors import SaRAError
from sara_train.train_state import load_training_state, training_state_tensors

STEPS, PROGRESSIVE_AT = 6, 3


def make_optimizer(seed: int = 0) -> tuple[TinyNet, sara_train.SaRAAdamW]:
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = sara_train.SaRAAdamW(model, lr=5e-2, budget=0.3, rank_weight=1e-3, rank_layers_per_step=1,
                                     progressive_at=PROGRESSIVE_AT)
    return model, optimizer


def run_steps(model: nn.Module, optimizer: sara_train.SaRAAdamW, steps: range, batch) -> None:
    x, y = batch
    for step in steps:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x + step), y).backward()
        optimizer.step()


def assert_same_delta(got: sara_train.SparseDelta, expected: sara_train.SparseDelta) -> None:
    assert got.layers.keys() == expected.layers.keys()
    for name, layer in expected.layers.items():
        assert torch.equal(got.layers[name].flat_indices, layer.flat_indices), name
        assert torch.equal(got.layers[name].values, layer.values), name


@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_resume_is_bit_exact(tmp_path, batch, stop_at: int) -> None:
    model, optimizer = make_optimizer()
    run_steps(model, optimizer, range(STEPS), batch)
    expected = optimizer.handle.delta()

    first, first_optimizer = make_optimizer()
    run_steps(first, first_optimizer, range(stop_at), batch)
    save_file(training_state_tensors(first_optimizer), str(tmp_path / "state.safetensors"))

    resumed, resumed_optimizer = make_optimizer()
    load_training_state(resumed_optimizer, load_file(str(tmp_path / "state.safetensors")))
    assert_same_delta(resumed_optimizer.handle.delta(), first_optimizer.handle.delta())
    torch.testing.assert_close(resumed(batch[0]), first(batch[0]), rtol=0, atol=0)
    run_steps(resumed, resumed_optimizer, range(stop_at, STEPS), batch)
    assert_same_delta(resumed_optimizer.handle.delta(), expected)
    assert resumed_optimizer.handle.num_trainable == optimizer.handle.num_trainable < 0.3 * optimizer.handle.num_targeted


def test_state_of_another_base_is_refused(batch) -> None:
    model, optimizer = make_optimizer(seed=0)
    run_steps(model, optimizer, range(1), batch)
    state = training_state_tensors(optimizer)
    _, other_optimizer = make_optimizer(seed=1)
    with pytest.raises(SaRAError, match="other base weights|does not match"):
        load_training_state(other_optimizer, state)
