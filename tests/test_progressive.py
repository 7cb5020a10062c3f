"""Progressive re-selection keeps optimizer state and learned values; SaRAAdamW does it itself."""

import copy

import torch
from conftest import TinyNet
from torch import nn

import sara_train


def train(
    model: nn.Module, handle: sara_train.SaRAHandle, optimizer: torch.optim.Optimizer, batch, steps: int
) -> None:
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_reselect_keeps_state_of_kept_entries_and_freezes_the_rest(tiny_net: TinyNet, batch) -> None:
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.2))
    optimizer = torch.optim.Adam(handle.parameters(), lr=0.05)
    train(tiny_net, handle, optimizer, batch, 5)
    old = {
        name: (u.values.detach().clone(), u.flat_indices.clone(), dict(optimizer.state[u.values]))
        for name, u in handle.layers.items()
    }
    delta_before = handle.delta()
    remaining = handle.reselect(optimizer)

    assert 0 < remaining < sum(v.numel() for v, _, _ in old.values())
    assert remaining == handle.num_trainable
    for name, update in handle.layers.items():
        values, indices, state = old[name]
        keep = values.abs() < handle.threshold
        assert torch.equal(update.flat_indices, indices[keep])
        assert torch.equal(update.values.detach(), values[keep])
        new_state = optimizer.state[update.values]
        assert torch.equal(new_state["exp_avg"], state["exp_avg"][keep])
        assert torch.equal(new_state["exp_avg_sq"], state["exp_avg_sq"][keep])
        assert torch.equal(new_state["step"], state["step"])
        assert any(p is update.values for g in optimizer.param_groups for p in g["params"])
    # re-selection alone changes nothing: same model, same delta
    after = handle.delta()
    for key, layer in delta_before.layers.items():
        assert torch.equal(after.layers[key].flat_indices, layer.flat_indices)
        torch.testing.assert_close(after.layers[key].values, layer.values)

    frozen = {
        name: (u.frozen_indices.clone(), handle.weight(name).flatten()[u.frozen_indices].clone())
        for name, u in handle.layers.items()
    }
    train(tiny_net, handle, optimizer, batch, 3)
    for name, (indices, values) in frozen.items():
        assert torch.equal(handle.weight(name).flatten()[indices], values), "a frozen entry moved"
    final = handle.delta()
    assert final.num_entries == delta_before.num_entries  # frozen learned entries stay in the delta


def test_reselect_without_optimizer_argument_swaps_at_next_step(tiny_net: TinyNet, batch) -> None:
    twin = copy.deepcopy(tiny_net)
    runs = []
    for model, pass_optimizer in ((tiny_net, True), (twin, False)):
        handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.2))
        optimizer = torch.optim.AdamW(handle.parameters(), lr=0.05)
        train(model, handle, optimizer, batch, 4)
        handle.reselect(optimizer if pass_optimizer else None)
        train(model, handle, optimizer, batch, 3)
        runs.append(handle.delta())
        handle.remove()
    for key, layer in runs[0].layers.items():
        torch.testing.assert_close(runs[1].layers[key].values, layer.values, rtol=0, atol=0)


def test_sara_adamw_one_line_form(tiny_net: TinyNet, batch) -> None:
    twin = copy.deepcopy(tiny_net)
    optimizer = sara_train.SaRAAdamW(tiny_net, lr=0.05, budget=0.2, rank_weight=0.01, progressive_at=3)
    x, y = batch
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(tiny_net(x), y).backward()
        optimizer.step()
    assert optimizer.last_rank_loss > 0

    handle = sara_train.inject(twin, sara_train.SaRAConfig(budget=0.2))
    manual = torch.optim.AdamW(
        handle.parameters(), lr=0.05, weight_decay=0.0
    )  # SaRAAdamW decays ΔP only, by default not at all
    for step in range(1, 6):
        manual.zero_grad()
        (nn.functional.mse_loss(twin(x), y) + 0.01 * handle.rank_loss()).backward()
        manual.step()
        if step == 3:
            handle.reselect(manual)
    assert optimizer.handle.num_trainable == handle.num_trainable < handle.delta().num_entries
    for (_, got), (_, expected) in zip(optimizer.handle.named_parameters(), handle.named_parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
