"""Positions of the trained entries of one weight, kept row-compressed.

A weight of shape ``(out, ...)`` is viewed as the matrix ``[rows, cols] = matrix_shape(shape)``.
Its sorted flat positions ``p`` are stored as ``columns = p % cols`` (uint16 when ``cols <= 65536``,
else int32) and ``row_starts`` int32 [rows + 1] (row ``r``'s entries are
``columns[row_starts[r]:row_starts[r + 1]]``): about 2 bytes per entry instead of 4, exactly.
``expand`` rebuilds the int32 flat positions for one layer at a time when a kernel needs them.
"""

from __future__ import annotations

import math

import torch

UINT16_COLUMNS = 1 << 16
"""Matrices with at most this many columns store their column indices as uint16."""


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """2-D view of a weight: ``(out, in * kernel...)``; a 1-D tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def column_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """uint16 where every column index of the 2-D view fits, else int32."""
    return torch.uint16 if matrix_shape(shape)[1] <= UINT16_COLUMNS else torch.int32


def compress(flat_indices: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat positions [k] of a weight of ``shape`` -> ``(columns [k], row_starts int32 [rows + 1])``."""
    rows, cols = matrix_shape(shape)
    flat = flat_indices.long()
    counts = torch.bincount(flat // cols, minlength=rows)
    row_starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return (flat % cols).to(column_dtype(shape)), row_starts


def expand(columns: torch.Tensor, row_starts: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``compress``'s inverse: the sorted int32 flat positions [k]."""
    rows, cols = matrix_shape(shape)
    row_offsets = torch.arange(rows, dtype=torch.int32, device=columns.device) * cols
    counts = row_starts.diff()
    return torch.repeat_interleave(row_offsets, counts, output_size=columns.numel()) + columns.to(torch.int32)
