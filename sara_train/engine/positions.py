"""Positions of the trained entries of one weight, kept row-compressed.

A weight of shape ``(out, ...)`` is viewed as the matrix ``[rows, cols] = matrix_shape(shape)``.
Its sorted flat positions ``p`` are stored as ``columns`` (the column ``p % cols``: two bytes each,
little-endian in a uint8 tensor of 2k bytes, when ``cols <= 65536``, else int32 [k];
``column_indices`` reads them back) and ``row_starts`` int32 [rows + 1] (row ``r``'s entries are
the ``row_starts[r]``-th to ``row_starts[r + 1]``-th): about 2 bytes per entry instead of 4, exactly.
Bytes rather than a 16-bit dtype because collectives (gloo's broadcast of module buffers under DDP)
take uint8 but neither uint16 nor int16. ``expand`` rebuilds the int32 flat positions for one layer
at a time when a kernel needs them.
"""

from __future__ import annotations

import math

import torch

SHORT_COLUMNS = 1 << 16
"""Matrices with at most this many columns store their column indices in two bytes."""


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """2-D view of a weight: ``(out, in * kernel...)``; a 1-D tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def column_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """The stored columns' dtype: uint8 (two bytes each) where every column index of the 2-D view
    fits 16 bits, else int32."""
    return torch.uint8 if matrix_shape(shape)[1] <= SHORT_COLUMNS else torch.int32


def entry_count(columns: torch.Tensor) -> int:
    """How many entries the stored ``columns`` hold (without decoding them)."""
    return columns.numel() // 2 if columns.dtype == torch.uint8 else columns.numel()


def column_indices(columns: torch.Tensor) -> torch.Tensor:
    """The stored ``columns`` as int32 column indices [k]."""
    if columns.dtype == torch.uint8:
        return columns.view(torch.int16).to(torch.int32) & 0xFFFF
    return columns


def compress(flat_indices: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat positions [k] of a weight of ``shape`` -> ``(columns [k], row_starts int32 [rows + 1])``."""
    rows, cols = matrix_shape(shape)
    flat = flat_indices.long()
    counts = torch.bincount(flat // cols, minlength=rows)
    row_starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    columns = (flat % cols).to(torch.int32)
    if column_dtype(shape) == torch.uint8:
        columns = columns.to(torch.int16).view(torch.uint8)  # the low 16 bits, as bytes
    return columns, row_starts


def expand(columns: torch.Tensor, row_starts: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``compress``'s inverse: the sorted int32 flat positions [k]."""
    rows, cols = matrix_shape(shape)
    row_offsets = torch.arange(rows, dtype=torch.int32, device=columns.device) * cols
    indices = column_indices(columns)
    return torch.repeat_interleave(row_offsets, row_starts.diff(), output_size=indices.numel()) + indices
