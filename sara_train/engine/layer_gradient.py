"""The selected entries' weight gradient from the layer's input and output gradient (CPU).

By default (``sara_train.engine.sparse``) a layer's usual backward forms its whole weight gradient
and SaRA keeps the k selected entries. For ``nn.Linear`` and ``nn.Conv2d`` layers on a CPU,
``SaRAConfig(weight_gradient="auto")`` instead lets the layer run with a weight that takes no
gradient and attaches ``_LayerWeightGradient`` to its output, whose backward forms the k entries
directly, choosing per call (from the shapes only, so runs are reproducible):

* **sampled**: ``grad[e] = Σ_n grad_out[n, row(e)] · input[n, col(e)]`` at the selected entries
  only, a sampled dense-dense product over their CSR layout (``torch.sparse.sampled_addmm``; a
  convolution's input unfolded first), in fp32. It costs ~k·n instead of out·in·n and wins where the
  dense weight gradient is memory-bound: few rows n (low-resolution layers) and low density;
* **dense**: the layer's usual weight gradient (``gyᵀ x``, ``torch.nn.grad.conv2d_weight``), gathered.

``benchmarks/weight_gradient.py`` measures both per SD1.5 layer shape; ``sampled_is_faster``
encodes where the sampled product won there (rows: of the layer's product, batch x tokens or
output positions). The two agree to fp32 rounding (different summation
order), so this path is not bit-identical to the dense one; ``weight_gradient="dense"`` is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from . import positions

SAMPLED_LINEAR_DENSITY = 0.06
SAMPLED_LINEAR_ROWS = 4096
"""A linear layer's selected entries are formed sampled up to this density and this many rows
(measured on SD1.5's linear shapes at 5 %: 0.17-0.98x the dense time at 128 to 2048 rows,
1.15-2.6x at 8192; at 10 %, 0.33-1.13x)."""
SAMPLED_CONV_ROWS = 1024
SAMPLED_CONV_DENSITY_ROWS = 40.0
"""A convolution's, with at most ``SAMPLED_CONV_ROWS`` rows (batch x output positions) and
``density * rows`` at most ``SAMPLED_CONV_DENSITY_ROWS``: unfolding the input costs ~rows x in x
kernel whatever the density, so full-resolution layers keep the dense gradient (SD1.5, batch 2:
0.05-0.16x at 4x4 and 8x8, 0.71x at 16x16 and 5 %, 2.7x at 32x32)."""


@dataclass(frozen=True)
class LayerGeometry:
    """How a layer maps its input to its output: ``kind`` "linear" or "conv2d" (with the
    convolution's ``kernel_size``, ``stride``, ``padding``, ``dilation``)."""

    kind: str
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


def layer_geometry(module: nn.Module, param_name: str) -> LayerGeometry | None:
    """The geometry of ``module`` if its ``param_name`` can take the layer path: the weight of an
    ``nn.Linear``, or of an ``nn.Conv2d`` with one group, zero padding given as numbers. Else None."""
    if param_name != "weight":
        return None
    if type(module) is nn.Linear:
        return LayerGeometry("linear")
    if (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return LayerGeometry("conv2d", module.kernel_size, module.stride, module.padding, module.dilation)
    return None


def sampled_is_faster(geometry: LayerGeometry, rows: int, density: float) -> bool:
    """Whether the sampled product beats dense-then-gather for this call (see the module docstring)."""
    if geometry.kind == "linear":
        return density <= SAMPLED_LINEAR_DENSITY and rows <= SAMPLED_LINEAR_ROWS
    return rows <= SAMPLED_CONV_ROWS and density * rows <= SAMPLED_CONV_DENSITY_ROWS


def as_matrices(
    geometry: LayerGeometry, grad_output: torch.Tensor, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_out [n, out], columns [n, in * kernel])`` in fp32, n = rows of the layer's product."""
    if geometry.kind == "linear":
        return grad_output.reshape(-1, grad_output.shape[-1]).float(), inputs.reshape(-1, inputs.shape[-1]).float()
    unfolded = functional.unfold(
        inputs.float(), geometry.kernel_size, geometry.dilation, geometry.padding, geometry.stride
    )  # [batch, in * kernel, positions]
    grad_rows = grad_output.float().flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])
    return grad_rows, unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def sampled_product(
    grad_rows: torch.Tensor, input_rows: torch.Tensor, columns: torch.Tensor, row_starts: torch.Tensor
) -> torch.Tensor:
    """``(grad_rowsᵀ input_rows)`` at the CSR positions only, in their (row-major) order: fp32 [k]."""
    shape = (grad_rows.shape[1], input_rows.shape[1])
    indices = positions.column_indices(columns)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled", UserWarning)
        layout = torch.sparse_csr_tensor(
            row_starts, indices, torch.zeros(indices.numel(), device=indices.device), shape
        )
        product = torch.sparse.sampled_addmm(layout, grad_rows.T.contiguous(), input_rows.contiguous(), beta=0.0)
    return product.values()


def weight_gradient_at(
    geometry: LayerGeometry,
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    columns: torch.Tensor,
    row_starts: torch.Tensor,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """The layer's weight gradient at the selected entries (row-compressed ``columns``/``row_starts``
    of a weight of ``shape``), [k] in order: ``sampled_gradient_at`` or ``dense_gradient_at``,
    whichever ``sampled_is_faster`` picks for these shapes."""
    rows = grad_output.numel() // grad_output.shape[-1 if geometry.kind == "linear" else 1]
    density = positions.entry_count(columns) / max(1, torch.Size(shape).numel())
    if sampled_is_faster(geometry, rows, density):
        return sampled_gradient_at(geometry, grad_output, inputs, columns, row_starts)
    return dense_gradient_at(geometry, grad_output, inputs, columns, row_starts, shape)


def sampled_gradient_at(
    geometry: LayerGeometry,
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    columns: torch.Tensor,
    row_starts: torch.Tensor,
) -> torch.Tensor:
    """The selected entries' gradient as a sampled product (fp32 [k])."""
    return sampled_product(*as_matrices(geometry, grad_output, inputs), columns, row_starts)


def dense_gradient_at(
    geometry: LayerGeometry,
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    columns: torch.Tensor,
    row_starts: torch.Tensor,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """The layer's whole weight gradient (in the output gradient's dtype), gathered at the entries [k]."""
    inputs = inputs.to(grad_output.dtype)
    if geometry.kind == "linear":
        dense = grad_output.reshape(-1, grad_output.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])
    else:
        dense = torch.nn.grad.conv2d_weight(
            inputs, shape, grad_output, geometry.stride, geometry.padding, geometry.dilation
        )
    return dense.reshape(-1).index_select(0, positions.expand(columns, row_starts, shape))


class LayerWeightGradient(torch.autograd.Function):
    """A layer's ``output``, passed through unchanged (its gradient flows on to the input as the
    layer's own backward computes it); the gradient of ``values`` is formed from the saved layer
    ``inputs`` and the output gradient by ``weight_gradient_at``."""

    @staticmethod
    def forward(ctx, output, inputs, values, columns, row_starts, shape, geometry):
        ctx.save_for_backward(inputs, columns, row_starts)
        ctx.shape, ctx.geometry, ctx.values_dtype = shape, geometry, values.dtype
        return output.view_as(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        inputs, columns, row_starts = ctx.saved_tensors
        grad_values = weight_gradient_at(ctx.geometry, grad_output, inputs, columns, row_starts, ctx.shape)
        return grad_output, None, grad_values.to(ctx.values_dtype), None, None, None, None
