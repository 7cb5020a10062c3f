"""Each object gives and takes its own state: a SaRAAdamW (its handle, the sparse weights, the Adam
moments) restored from ``state_dict()`` on a fresh injection continues bit-identically, across a
progressive step and through the trainer's safetensors state file."""

import pytest
import torch
from conftest import TinyNet
from torch import nn

import sara_train
from sara_train.engine.errors import SaRAError
from sara_train.engine.optim import SaRAOptimizer, sara_optimizer_class
from sara_train.trainer.state_file import read_state_file, save_state_file

STEPS, PROGRESSIVE_AT = 6, 3


def make_optimizer(seed: int = 0, moments: str = "fp32") -> tuple[TinyNet, SaRAOptimizer]:
    torch.manual_seed(seed)
    model = TinyNet()
    extra = {"min_8bit_size": 0} if moments == "8bit" else {}  # the tiny layers' moments quantized too
    optimizer = sara_optimizer_class(moments)(
        model,
        lr=5e-2,
        budget=0.3,
        rank_weight=1e-3,
        rank_layers_per_step=1,
        progressive_at=PROGRESSIVE_AT,
        weight_decay=0.1,
        **extra,
    )
    return model, optimizer


def run_steps(model: nn.Module, optimizer: SaRAOptimizer, steps: range, batch) -> None:
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


@pytest.mark.parametrize(("moments", "stop_at"), [("fp32", 2), ("fp32", 3), ("fp32", 4), ("8bit", 2), ("8bit", 4)])
def test_resume_is_bit_exact(tmp_path, batch, moments: str, stop_at: int) -> None:
    model, optimizer = make_optimizer(moments=moments)
    run_steps(model, optimizer, range(STEPS), batch)
    expected = optimizer.handle.delta()

    first, first_optimizer = make_optimizer(moments=moments)
    run_steps(first, first_optimizer, range(stop_at), batch)
    save_state_file(tmp_path / "state.safetensors", first_optimizer.state_dict(), {"note": "test"})

    resumed, resumed_optimizer = make_optimizer(moments=moments)
    state, metadata = read_state_file(tmp_path / "state.safetensors")
    assert metadata == {"note": "test"}
    resumed_optimizer.load_state_dict(state)
    assert_same_delta(resumed_optimizer.handle.delta(), first_optimizer.handle.delta())
    torch.testing.assert_close(resumed(batch[0]), first(batch[0]), rtol=0, atol=0)
    run_steps(resumed, resumed_optimizer, range(stop_at, STEPS), batch)
    assert_same_delta(resumed_optimizer.handle.delta(), expected)
    if moments == "8bit":
        assert all(state["state1"].dtype == torch.uint8 for state in resumed_optimizer.state.values())
    assert (
        resumed_optimizer.handle.num_trainable == optimizer.handle.num_trainable < 0.3 * optimizer.handle.num_targeted
    )


def test_the_sparse_weight_and_the_model_carry_their_state(batch) -> None:
    """``SparseUpdate.load_state_dict`` takes a state of another size (after re-selection), also
    through the model's own ``load_state_dict``: the injected model is restored as a whole."""
    model, optimizer = make_optimizer()
    run_steps(model, optimizer, range(STEPS), batch)
    saved = model.state_dict()
    fresh, _ = make_optimizer()
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(batch[0]), model(batch[0]), rtol=0, atol=0)


def test_state_of_another_base_is_refused(batch) -> None:
    model, optimizer = make_optimizer(seed=0)
    run_steps(model, optimizer, range(1), batch)
    state = optimizer.state_dict()
    other_model, other_optimizer = make_optimizer(seed=1)
    before = {k: v.clone() for k, v in other_model.state_dict().items()}
    with pytest.raises(SaRAError, match="other base weights"):
        other_optimizer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in other_model.state_dict().items())
