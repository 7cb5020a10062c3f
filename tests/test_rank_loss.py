"""Nuclear-norm loss: value and gradient against autograd through torch.linalg.svdvals."""

import pytest
import torch
from torch import nn

import sara_train
from sara_train.engine import rank_loss
from sara_train.engine.rank_loss import dense_update, nuclear_norm_and_grad


def perturbed_handle(module: nn.Module, seed: int = 0) -> sara_train.SaRAHandle:
    handle = sara_train.inject(module, sara_train.SaRAConfig(budget=0.3))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return handle


@pytest.mark.parametrize(
    "module", [nn.Linear(9, 6), nn.Linear(5, 12), nn.Conv2d(4, 7, 3)], ids=["wide", "tall", "conv"]
)
def test_rank_loss_matches_svdvals_autograd(module: nn.Module) -> None:
    torch.manual_seed(0)
    handle = perturbed_handle(module)
    (update,) = handle.layers.values()
    values = update.values
    loss = handle.rank_loss()
    (grad,) = torch.autograd.grad(loss, values)

    reference_values = values.detach().clone().requires_grad_(True)
    dense = (
        torch.zeros(update.shape)
        .flatten()
        .index_put((update.flat_indices.long(),), reference_values - update.base_values)
    )
    reference = torch.linalg.svdvals(dense.view(update.shape[0], -1)).sum()
    (reference_grad,) = torch.autograd.grad(reference, reference_values)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


def test_large_layer_in_float32_is_accurate() -> None:
    torch.manual_seed(0)
    handle = perturbed_handle(nn.Linear(2200, 2000))  # > FLOAT64_UP_TO entries: float32 Gram path
    (update,) = handle.layers.values()
    norm, grad = nuclear_norm_and_grad(update)
    matrix = dense_update(update, torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(norm.double(), s.sum(), rtol=1e-4, atol=0)
    expected = (u @ vh).flatten()[update.flat_indices.long()]
    assert float((grad.double() - expected).norm() / expected.norm()) < 1e-3


def test_zero_update_has_zero_loss_and_gradient() -> None:
    handle = sara_train.inject(nn.Linear(6, 4), sara_train.SaRAConfig(budget=0.5))
    loss = handle.rank_loss()
    (grad,) = torch.autograd.grad(loss, next(handle.parameters()))
    assert loss.item() == 0.0 and not grad.any()


def test_layers_per_step_rotates_and_keeps_the_expected_total() -> None:
    torch.manual_seed(0)
    handle = perturbed_handle(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7), nn.Linear(7, 4)))
    full = handle.rank_loss().item()
    per_layer = [float(nuclear_norm_and_grad(u)[0]) for u in handle.layers.values()]
    partial = [handle.rank_loss(layers_per_step=1).item() for _ in range(3)]
    torch.testing.assert_close(torch.tensor(partial), 3 * torch.tensor(per_layer))
    torch.testing.assert_close(sum(partial) / 3, full, rtol=1e-6, atol=1e-6)


def test_add_rank_loss_grad_equals_autograd_of_rank_loss() -> None:
    torch.manual_seed(0)
    handle = perturbed_handle(nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 3, 2)))
    (0.5 * handle.rank_loss()).backward()
    expected = [p.grad.clone() for p in handle.parameters()]
    for p in handle.parameters():
        p.grad = None
    handle.add_rank_loss_grad(0.5)
    for p, e in zip(handle.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("out_features, in_features", [(2048, 2048), (2048, 6144), (6144, 2048)])
def test_wide_layers_estimate_the_norm_and_gradient_close_to_exact(out_features: int, in_features: int) -> None:
    """DiT-wide layers (both sides >= ESTIMATE_FROM_SIDE) get the sparse estimate; it is measured
    against the exact Gram/eigh values on a trained-like update whose rows differ in scale, with
    part of the entries frozen by a progressive step (the norm covers them, the gradient not)."""
    torch.manual_seed(0)
    handle = sara_train.inject(nn.Linear(in_features, out_features, bias=False), sara_train.SaRAConfig(budget=0.03))
    (update,) = handle.layers.values()
    row_scale = 1 + 3 * torch.rand(out_features)
    with torch.no_grad():
        rows = update.flat_indices.long() // in_features
        update.values.add_(0.3 * handle.threshold * torch.randn(update.values.shape) * row_scale[rows])
    handle.reselect()
    assert 0 < update.values.numel() < update.frozen_indices.numel() + update.values.numel()
    assert min(rank_loss.matrix_shape(update.shape)) >= rank_loss.ESTIMATE_FROM_SIDE

    norm, grad = nuclear_norm_and_grad(update)
    exact_norm, exact_grad = rank_loss.exact_nuclear_norm_and_grad(update)
    assert abs(float(norm / exact_norm) - 1) < 0.03
    cosine = torch.nn.functional.cosine_similarity(grad.double(), exact_grad.double(), dim=0)
    assert cosine > 0.98, float(cosine)
    assert torch.equal(nuclear_norm_and_grad(update)[1], grad)  # seeded probes: deterministic
