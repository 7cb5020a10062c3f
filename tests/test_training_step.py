"""A SaRA step is a dense step with the gradient masked to the selected entries; unselected
entries never change; checkpointing, autocast, accumulation, clipping and dtypes work."""

import copy
import functools

import pytest
import torch
from conftest import TinyNet
from torch import nn
from torch.utils.checkpoint import checkpoint

import sara_train


def masked_dense_reference(model: nn.Module, selected: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Make ``model`` train its whole targeted weights with gradients zeroed outside ``selected``."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
        if name in selected:
            mask = torch.zeros(param.numel(), dtype=torch.bool)
            mask[selected[name].long()] = True
            param.register_hook(functools.partial(torch.mul, other=mask.view_as(param)))
            params.append(param)
    return params


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def selected_indices(handle: sara_train.SaRAHandle) -> dict[str, torch.Tensor]:
    return {name: update.flat_indices.clone() for name, update in handle.layers.items()}


@pytest.mark.parametrize(
    "optimizer_cls, kwargs",
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ],
)
def test_sara_step_equals_masked_dense_step(tiny_net: TinyNet, batch, optimizer_cls, kwargs) -> None:
    reference = copy.deepcopy(tiny_net)
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.1))
    selected = selected_indices(handle)
    optimizer = optimizer_cls(handle.parameters(), **kwargs)
    ref_optimizer = optimizer_cls(masked_dense_reference(reference, selected), **kwargs)
    for _ in range(4):
        for model, opt in ((tiny_net, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    handle.remove()
    for name, tensor in tiny_net.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=1e-6, atol=1e-7)
    assert set(selected) == {"conv.weight", "proj.weight", "head.weight"}


def test_unselected_entries_never_change(tiny_net: TinyNet, batch) -> None:
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.2))
    selected = selected_indices(handle)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (loss_fn(tiny_net, batch) + 0.01 * handle.rank_loss()).backward()
        optimizer.step()
    handle.remove()
    for name, tensor in tiny_net.state_dict().items():
        changed = (tensor != before[name]).flatten()
        outside = torch.ones_like(changed)
        if name in selected:
            outside[selected[name].long()] = False
            assert bool(changed[~outside].any()), f"{name}: selected entries did not train"
        assert not bool(changed[outside].any()), f"{name}: an unselected entry changed"


def test_only_sparse_values_are_trainable(tiny_net: TinyNet, batch) -> None:
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.1))
    loss_fn(tiny_net, batch).backward()
    trainable = [p for p in tiny_net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in handle.parameters()}
    assert all(p.grad is None for p in tiny_net.parameters() if not p.requires_grad)
    assert sum(p.numel() for p in trainable) == handle.num_trainable == round(0.1 * handle.num_targeted)
    assert all(p.dim() == 1 for p in trainable)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_weights_keep_their_dtype(batch, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).to(dtype)
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.1))
    optimizer = torch.optim.Adam(handle.parameters(), lr=1e-2)
    x = torch.randn(4, 8, dtype=dtype)
    first = model(x).float().pow(2).mean()
    for _ in range(5):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    handle.remove()
    assert all(p.dtype == dtype for p in model.parameters())
    assert model(x).float().pow(2).mean() < first


class CheckpointedNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.nn.functional.silu(self.norm(self.conv(t))), x, use_reentrant=False)
        h = checkpoint(lambda t: torch.nn.functional.gelu(self.proj(t.mean(dim=(2, 3)))), h, use_reentrant=False)
        return self.head(h)


def train_values(
    model: nn.Module, batch, steps: int = 3, micro_batches: int = 1, clip: float | None = None, autocast: bool = False
) -> dict[str, torch.Tensor]:
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.15))
    optimizer = torch.optim.Adam(handle.parameters(), lr=1e-2)
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(xs).float(), ys) / micro_batches
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(handle.parameters(), clip)
        optimizer.step()
    return {name: p.detach().clone() for name, p in handle.named_parameters()}


def test_gradient_checkpointing_gives_the_same_update(batch) -> None:
    torch.manual_seed(0)
    plain = TinyNet()
    checkpointed = CheckpointedNet()
    checkpointed.load_state_dict(plain.state_dict())
    expected, got = train_values(plain, batch), train_values(checkpointed, batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_gradient_accumulation_equals_full_batch(batch) -> None:
    torch.manual_seed(0)
    full = TinyNet()
    accumulated = copy.deepcopy(full)
    full.norm = nn.Identity()  # GroupNorm statistics are per sample anyway; keep the nets simple
    accumulated.norm = nn.Identity()
    expected, got = train_values(full, batch), train_values(accumulated, batch, micro_batches=3)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_on_handle_parameters(tiny_net: TinyNet, batch) -> None:
    reference = copy.deepcopy(tiny_net)
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.1))
    ref_params = masked_dense_reference(reference, selected_indices(handle))
    loss_fn(tiny_net, batch).backward()
    loss_fn(reference, batch).backward()
    norm = torch.nn.utils.clip_grad_norm_(handle.parameters(), 1e-3)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1e-3)
    torch.testing.assert_close(norm, ref_norm)
    total = torch.cat([p.grad for p in handle.parameters()]).norm()
    torch.testing.assert_close(total, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_autocast_trains_fp32_masters(batch) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    values = train_values(model, batch, autocast=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in values.values())
    assert model.conv.weight.dtype == torch.float32
    assert not torch.equal(model.proj.parametrizations.weight.original, start["proj.weight"])


def shifted_optimizer(model: nn.Module, **kwargs) -> tuple[sara_train.SaRAAdamW, dict[str, torch.Tensor]]:
    """A SaRAAdamW whose values sit at base + δ (δ = 0.01, 0.02, ...), with zero gradients set;
    returns it and the δ per layer."""
    optimizer = sara_train.SaRAAdamW(model, lr=0.5, budget=0.3, **kwargs)
    shifts = {}
    with torch.no_grad():
        for name, update in optimizer.handle.layers.items():
            shifts[name] = 0.01 * torch.arange(1, update.values.numel() + 1, dtype=torch.float32)
            update.values.add_(shifts[name])
            update.values.grad = torch.zeros_like(update.values)
    return optimizer, shifts


def test_a_step_without_task_gradient_leaves_every_weight_unchanged(tiny_net: TinyNet, batch) -> None:
    """The default decay is 0 (torch's AdamW would shrink the selected weights by lr * 0.01)."""
    optimizer, _ = shifted_optimizer(tiny_net)
    tiny_net(batch[0])  # writes the shifted values into the weights
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    values_before = [p.detach().clone() for p in optimizer.handle.parameters()]
    optimizer.step()
    tiny_net(batch[0])
    assert all(torch.equal(p, q) for p, q in zip(optimizer.handle.parameters(), values_before))
    assert all(torch.equal(v, before[k]) for k, v in tiny_net.state_dict().items())


def test_weight_decay_shrinks_the_update_toward_the_pretrained_weights(tiny_net: TinyNet) -> None:
    """Decoupled decay of ΔP: after a zero-gradient step ΔP = δ (1 - lr * decay); the pretrained
    values (and every unselected entry) stay."""
    optimizer, shifts = shifted_optimizer(tiny_net, weight_decay=0.1)
    optimizer.step()
    delta = optimizer.handle.delta()
    for name, shift in shifts.items():
        torch.testing.assert_close(delta.layers[name].values, shift * (1 - 0.5 * 0.1), rtol=1e-6, atol=1e-7)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # the group keeps its setting between steps
