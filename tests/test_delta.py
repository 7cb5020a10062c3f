"""SparseDelta: file round trip, apply/undo, stacking, summary, remove()."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from safetensors import safe_open
from torch import nn

import sara_train


@pytest.fixture
def trained(tiny_net: TinyNet, batch):
    """(pristine copy, trained-and-removed model, its delta)."""
    pristine = copy.deepcopy(tiny_net)
    optimizer = sara_train.SaRAAdamW(tiny_net, lr=0.05, budget=0.15, rank_weight=0.01, progressive_at=3)
    x, y = batch
    for _ in range(6):
        optimizer.zero_grad()
        nn.functional.mse_loss(tiny_net(x), y).backward()
        optimizer.step()
    delta = optimizer.handle.delta(metadata={"note": "test"})
    optimizer.handle.remove()
    return pristine, tiny_net, delta


def test_round_trip_is_exact_in_float32(trained, tmp_path: Path) -> None:
    _, _, delta = trained
    path = delta.save(tmp_path / "d.safetensors")
    loaded = sara_train.SparseDelta.load(path)
    assert loaded.metadata == {"note": "test"}
    assert loaded.base_fingerprint == delta.base_fingerprint
    assert loaded.selection == delta.selection
    for key, layer in delta.layers.items():
        got = loaded.layers[key]
        assert got.shape == layer.shape
        assert torch.equal(got.flat_indices, layer.flat_indices) and got.flat_indices.dtype == torch.int32
        assert torch.equal(got.values, layer.values)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "sara-delta" and meta["format_version"] == "1"
        assert json.loads(meta["shapes"])["proj.weight"] == [16, 8]
        assert set(f.keys()) == {k + s for k in delta.layers for s in ("::idx", "::val", "::probe_idx", "::probe_val")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_in_half_precision(trained, tmp_path: Path, dtype: torch.dtype) -> None:
    _, _, delta = trained
    loaded = sara_train.SparseDelta.load(delta.save(tmp_path / "d.safetensors", dtype=dtype))
    for key, layer in delta.layers.items():
        assert loaded.layers[key].values.dtype == dtype
        torch.testing.assert_close(loaded.layers[key].values.float(), layer.values, rtol=1e-2, atol=1e-6)
    assert loaded.summary().nbytes == delta.num_entries * (4 + torch.finfo(dtype).bits // 8)


def test_apply_to_fresh_copy_reproduces_the_trained_model(trained, batch, tmp_path: Path) -> None:
    pristine, model, delta = trained
    x, _ = batch
    base_out = pristine(x)
    fresh = copy.deepcopy(pristine)
    sara_train.SparseDelta.load(delta.save(tmp_path / "d.safetensors")).apply_to(fresh)
    # base + (trained - base) equals trained up to one float32 rounding
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(fresh(x), base_out)
    state = {k: v.clone() for k, v in pristine.state_dict().items()}
    delta.apply_to(state)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(state[key], tensor, rtol=1e-6, atol=1e-7)
    delta.apply_to(fresh, strength=-1.0)
    torch.testing.assert_close(fresh(x), base_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restore_point_undoes_apply_bit_exactly(trained, dtype: torch.dtype) -> None:
    pristine, _, delta = trained
    state = {k: v.to(dtype) for k, v in pristine.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    restore_point = delta.apply_to(state, strength=0.7)
    assert any(not torch.equal(state[k], before[k]) for k in state)
    restore_point.restore()
    assert all(torch.equal(state[k], before[k]) for k in state)
    restore_point.restore()  # a second call changes nothing
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_strength_zero_and_half(trained, batch) -> None:
    pristine, model, delta = trained
    x, _ = batch
    zero = copy.deepcopy(pristine)
    delta.apply_to(zero, strength=0.0)
    assert torch.equal(zero(x), pristine(x))
    half = copy.deepcopy(pristine)
    delta.apply_to(half, strength=0.5)
    expected = {k: (pristine.state_dict()[k] + model.state_dict()[k]) / 2 for k in delta.layers}
    for key, tensor in expected.items():
        torch.testing.assert_close(half.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)


def test_stacked_deltas_equal_their_sum(trained, batch) -> None:
    pristine, _, delta = trained
    torch.manual_seed(5)
    other_model = copy.deepcopy(pristine)
    handle = sara_train.inject(other_model, sara_train.SaRAConfig(threshold=0.1))
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    other = handle.delta()
    stacked = sara_train.SparseDelta.stack([delta, other], strengths=[0.7, -0.4])
    one_by_one, at_once = copy.deepcopy(pristine), copy.deepcopy(pristine)
    delta.apply_to(one_by_one, 0.7)
    other.apply_to(one_by_one, -0.4)
    stacked.apply_to(at_once)
    for key, tensor in one_by_one.state_dict().items():
        torch.testing.assert_close(at_once.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)
    assert (delta + other).num_entries == stacked.num_entries >= max(delta.num_entries, other.num_entries)


def test_remove_merges_the_update(tiny_net: TinyNet, batch) -> None:
    x, y = batch
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.1))
    optimizer = torch.optim.Adam(handle.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(tiny_net(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        trained_out = tiny_net(x)
    handle.remove()
    assert type(tiny_net.proj) is nn.Linear and "parametrizations" not in dict(tiny_net.named_modules())
    assert set(tiny_net.state_dict()) == set(TinyNet().state_dict())
    assert all(p.requires_grad for p in tiny_net.parameters())
    torch.testing.assert_close(tiny_net(x), trained_out, rtol=0, atol=0)


def test_summary_lists_layers(trained) -> None:
    _, _, delta = trained
    summary = delta.summary()
    assert summary.entries == delta.num_entries == sum(row[2] for row in summary.layers)
    assert [row[0] for row in summary.layers] == sorted(delta.layers)
    text = str(summary)
    assert "proj.weight" in text and delta.base_fingerprint in text and "note=test" in text


def test_biases_and_norm_weights_train_and_round_trip(tiny_net: TinyNet, batch) -> None:
    pristine = copy.deepcopy(tiny_net)
    config = sara_train.SaRAConfig(budget=0.3, include_bias=True, include_norm=True)
    handle = sara_train.inject(tiny_net, config)
    assert {"proj.bias", "norm.bias"} <= set(handle.layers)
    assert "norm.weight" not in handle.layers  # GroupNorm weights start at 1.0: never below threshold
    optimizer = torch.optim.Adam(handle.parameters(), lr=0.05)
    x, y = batch
    for _ in range(3):
        optimizer.zero_grad()
        (nn.functional.mse_loss(tiny_net(x), y) + 0.01 * handle.rank_loss()).backward()
        optimizer.step()
    delta = handle.delta()
    handle.remove()
    assert delta.layers["norm.bias"].numel > 0
    delta.apply_to(pristine)
    torch.testing.assert_close(pristine(x), tiny_net(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_remove_without_merge_restores_the_pretrained_weights_exactly(batch, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch
    optimizer = sara_train.SaRAAdamW(model, lr=0.05, budget=0.2, progressive_at=2)
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        optimizer.step()
    assert any(u.frozen_indices.numel() for u in optimizer.handle.layers.values())
    with torch.no_grad():
        trained_out = model(x.to(dtype))
    delta = optimizer.handle.delta()
    optimizer.handle.remove(merge=False)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, pristine[key]), f"{key} differs from the pretrained weights"
    delta.apply_to(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.to(dtype)),
            trained_out,
            rtol=1e-3 if dtype == torch.float16 else 1e-6,
            atol=1e-3 if dtype == torch.float16 else 1e-7,
        )
