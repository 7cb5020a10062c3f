"""SparseEMA: the moving average of ΔP equals the closed form, across a progressive step."""

import pytest
import torch
from torch import nn

import sara_train
from sara_train import SparseEMA


def test_ema_is_the_closed_form_average_of_the_deltas_across_a_progressive_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    optimizer = sara_train.SaRAAdamW(model, lr=1e-2, budget=0.2, rank_weight=1e-3, progressive_at=5)
    ema = SparseEMA(optimizer.handle, decay=0.8)
    expected = {name: torch.zeros(update.values.numel()) for name, update in optimizer.handle.layers.items()}
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    for _ in range(10):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for name, layer in optimizer.handle.delta().layers.items():  # by hand: avg <- 0.8 avg + 0.2 ΔP
            expected[name] = 0.8 * expected[name] + 0.2 * layer.values
    assert optimizer.handle.num_trainable < sum(e.numel() for e in expected.values())  # some entries froze
    averaged = ema.delta()
    assert averaged.metadata["ema_updates"] == "10"
    for name, layer in averaged.layers.items():
        assert torch.equal(layer.flat_indices, optimizer.handle.delta().layers[name].flat_indices)
        torch.testing.assert_close(layer.values, expected[name], rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))  # the same initial weights
    merged = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    merged.load_state_dict(base.state_dict())
    averaged.apply_to(merged)  # it loads like any delta: base + averaged ΔP at the selected entries
    for name, layer in averaged.layers.items():
        got = merged.get_parameter(name).detach().flatten()[layer.flat_indices.long()]
        want = base.get_parameter(name).detach().flatten()[layer.flat_indices.long()] + expected[name]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    state = ema.state_dict()
    again = SparseEMA(optimizer.handle, decay=0.8)
    again.load_state_dict(state)
    assert all(torch.equal(again.averages[n], ema.averages[n]) for n in ema.averages) and again.updates == 10
    with pytest.raises(sara_train.SaRAError, match="decay 0.8, not 0.9"):
        SparseEMA(optimizer.handle, decay=0.9).load_state_dict(state)
    with pytest.raises(sara_train.SaRAError, match="EMA decay must be in"):
        SparseEMA(optimizer.handle, decay=1.0)
