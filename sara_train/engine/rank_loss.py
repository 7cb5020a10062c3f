"""Nuclear-norm loss ``||ΔP||_*`` on each layer's sparse update, gradient to the trainable values.

The nuclear norm of ``A`` (m x n, m <= n after transposing; conv weights reshaped to
``out x in*k*k``) is ``sum(sqrt(eig(A Aᵀ)))`` and its gradient is ``U Σ⁻¹ Uᵀ A`` (= U Vᵀ of the SVD).
The Gram + ``eigh`` route is much faster than an SVD on the wide layers of diffusion models (the
README gives the timing). The gradient is computed together with the value and only its entries at
the trainable positions are kept, so nothing dense survives a layer.
"""

from __future__ import annotations

import math

import torch

from .sparse import SparseUpdate

FLOAT64_UP_TO = 1 << 22
"""Matrices with at most this many entries are decomposed in float64 (cheap, exact to 1e-12)."""


def dense_update(update: SparseUpdate, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's whole sparse update ΔP as a dense 2-D matrix ``[shape[0], prod(shape[1:])]``."""
    rows, cols = matrix_shape(update.shape)
    dense = torch.zeros(rows * cols, dtype=dtype, device=update.values.device)
    indices, deltas = update.sparse_delta()
    dense[indices] = deltas.to(dtype)
    return dense.view(rows, cols)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """2-D view of a weight: ``(out, in * kernel...)``; a 1-D tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def nuclear_norm_and_grad(update: SparseUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||ΔP||_*, d||ΔP||_*/d values)``: a 0-d fp32 tensor and an fp32 tensor of shape [k].

    Singular values below ``sqrt(m * eps) * σ_max`` (numerically zero) get a zero gradient, the
    minimum-norm subgradient. An all-zero update has norm 0 and gradient 0.
    """
    device = update.values.device
    rows, cols = matrix_shape(update.shape)
    dtype = torch.float64 if rows * cols <= FLOAT64_UP_TO else torch.float32
    matrix = dense_update(update, dtype)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    if not matrix.any():
        return zero, torch.zeros(update.values.shape, dtype=torch.float32, device=device)
    transposed = matrix.shape[0] > matrix.shape[1]
    a = matrix.T if transposed else matrix
    eigvals, eigvecs = torch.linalg.eigh(a @ a.T)
    sigma = eigvals.clamp_min(0).sqrt()
    cutoff = sigma.max() * (a.shape[0] * torch.finfo(dtype).eps) ** 0.5
    kept = sigma > cutoff
    u = eigvecs[:, kept]
    grad = (u / sigma[kept]) @ (u.T @ a)
    if transposed:
        grad = grad.T
    grad_values = grad.reshape(-1)[update.flat_indices].float()
    return sigma[kept].sum().float(), grad_values


class _NuclearNorm(torch.autograd.Function):
    """``||ΔP||_*`` of one layer as a differentiable function of its ``values``."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, update: SparseUpdate) -> torch.Tensor:
        norm, grad = nuclear_norm_and_grad(update)
        ctx.save_for_backward(grad)
        return norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


def nuclear_norm(update: SparseUpdate) -> torch.Tensor:
    """Differentiable ``||ΔP||_*`` (0-d fp32) of one layer's sparse update."""
    return _NuclearNorm.apply(update.values, update)
