"""The row-compressed positions of the trained entries, and where SparseUpdate keeps its state."""

from __future__ import annotations

import pytest
import torch

import sara_train
from sara_train.engine import positions
from sara_train.engine.sparse import SparseUpdate


@pytest.mark.parametrize(
    ("shape", "expected_dtype"),
    [
        ((7, 3, 3, 3), torch.uint8),  # a conv: 27 columns
        ((5, 65536), torch.uint8),  # the last column index that fits 16 bits
        ((3, 65537), torch.int32),
        ((100,), torch.uint8),  # 1-D: one row
        ((70000,), torch.int32),
    ],
)
def test_compress_expand_round_trip(shape: tuple[int, ...], expected_dtype: torch.dtype) -> None:
    numel = torch.Size(shape).numel()
    generator = torch.Generator().manual_seed(0)
    flat = torch.randperm(numel, generator=generator)[: max(1, numel // 20)].sort().values.to(torch.int32)
    flat = torch.cat([flat, torch.tensor([numel - 1], dtype=torch.int32)]).unique()  # the very last entry too
    columns, row_starts = positions.compress(flat, shape)
    assert columns.dtype == expected_dtype and row_starts.dtype == torch.int32
    assert row_starts.numel() == positions.matrix_shape(shape)[0] + 1
    assert torch.equal(positions.expand(columns, row_starts, shape), flat)


def test_compress_with_empty_rows_and_nothing_selected() -> None:
    shape = (4, 10)
    flat = torch.tensor([3, 31, 39], dtype=torch.int32)  # rows 1 and 2 hold nothing
    columns, row_starts = positions.compress(flat, shape)
    assert row_starts.tolist() == [0, 1, 1, 1, 3]
    assert positions.column_indices(columns).tolist() == [3, 1, 9]
    assert torch.equal(positions.expand(columns, row_starts, shape), flat)
    empty = torch.empty(0, dtype=torch.int32)
    assert positions.expand(*positions.compress(empty, shape), shape).numel() == 0


def test_sparse_update_stores_two_byte_columns_and_saves_flat_indices() -> None:
    weight = torch.randn(8, 4, 3, 3)
    flat = torch.tensor([0, 5, 40, 287], dtype=torch.int32)
    update = SparseUpdate(weight, flat)
    assert update.columns.dtype == torch.uint8 and update.columns.numel() == 2 * 4  # two bytes per entry
    assert positions.entry_count(update.columns) == 4
    assert torch.equal(update.flat_indices, flat)
    state = update.state_dict()
    assert "columns" not in state and "row_starts" not in state
    assert state["flat_indices"].dtype == torch.int32 and torch.equal(state["flat_indices"], flat)
    other = SparseUpdate(weight, torch.tensor([1, 2], dtype=torch.int32))
    other.load_state_dict(state)  # another selection size: resized, then compressed
    assert torch.equal(other.flat_indices, flat)
    assert torch.equal(other.base_values, weight.view(-1)[flat.long()])


def test_base_device_keeps_the_pretrained_values_where_they_are() -> None:
    """``module.to()`` moves the trained state but not the pretrained values ("meta" stands for an
    accelerator here: a real second device, and nothing is computed on it)."""
    weight = torch.randn(6, 10)
    flat = torch.tensor([1, 12, 59], dtype=torch.int32)
    kept = SparseUpdate(weight, flat, base_device="cpu").to("meta")
    assert kept.values.device.type == "meta" and kept.columns.device.type == "meta"
    assert kept.base_values.device.type == "cpu" and kept.frozen_base.device.type == "cpu"
    assert torch.equal(kept.base_values, weight.view(-1)[flat.long()])
    moved = SparseUpdate(weight, flat).to("meta")
    assert moved.base_values.device.type == "meta"


def test_base_device_must_be_a_device() -> None:
    with pytest.raises(sara_train.SaRAError, match="base_device 'gpu0' is not a device"):
        sara_train.SaRAConfig(base_device="gpu0")
