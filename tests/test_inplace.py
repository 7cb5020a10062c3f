"""Inference code that updates activations in place trains under ``out_of_place_augmented_assignments``:
``x += ...`` on a tensor in the autograd graph becomes out of place (the gradient equals the
out-of-place reference), while explicit in-place calls such as ``x.add_(mask)`` keep their meaning."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from sara_train.engine.inplace import out_of_place_augmented_assignments


def residual_block(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Written like ComfyUI's Flux blocks: the input is normalised (saved for backward), then updated."""
    h = torch.nn.functional.layer_norm(x, x.shape[-1:])
    x += h @ w
    x *= 0.5
    scores = x @ x.T
    scores.add_(mask)  # explicit in-place call, result ignored: must still apply
    return scores.softmax(-1) @ x


def reference_block(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.layer_norm(x, x.shape[-1:])
    x = (x + h @ w) * 0.5
    return (x @ x.T + mask).softmax(-1) @ x


def test_in_place_residuals_fail_under_autograd_without_the_mode() -> None:
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4) @ w  # in the graph
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        residual_block(x, w, torch.zeros(3, 3)).sum().backward()


def test_the_mode_trains_them_with_the_reference_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=generator, requires_grad=True)
    x0 = torch.randn(3, 4, generator=generator)
    mask = torch.randn(3, 3, generator=generator)
    with out_of_place_augmented_assignments():
        out = residual_block(x0 @ w, w, mask)
    out.sum().backward()
    grad, w.grad = w.grad.clone(), None
    expected = reference_block(x0 @ w, w, mask)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, w.grad, rtol=1e-6, atol=1e-7)


def test_tensors_outside_the_graph_keep_in_place_updates() -> None:
    counts = torch.zeros(3)
    alias = counts
    with out_of_place_augmented_assignments():
        counts += 1
    assert alias is counts and torch.equal(alias, torch.ones(3))


def test_a_frozen_input_updated_by_a_trained_branch_is_recomputed_alike_under_checkpointing() -> None:
    """``x += branch(x)`` where ``x`` comes from frozen layers and the branch is trained: in place,
    ``x`` would join the graph and change under the checkpoint, whose recomputation starts from it."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=generator, requires_grad=True)
    x0 = torch.randn(3, 4, generator=generator)

    def block(x: torch.Tensor) -> torch.Tensor:
        with out_of_place_augmented_assignments():
            h = torch.nn.functional.layer_norm(x, x.shape[-1:])
            x += h @ w
            return torch.nn.functional.layer_norm(x, x.shape[-1:]) @ w

    x = x0.clone()
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    out.sum().backward()
    grad, w.grad = w.grad.clone(), None
    assert torch.equal(x, x0) and not x.requires_grad  # the caller's tensor is untouched
    h = torch.nn.functional.layer_norm(x0, x0.shape[-1:])
    expected = torch.nn.functional.layer_norm(x0 + h @ w, x0.shape[-1:]) @ w
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, w.grad, rtol=1e-6, atol=1e-7)
