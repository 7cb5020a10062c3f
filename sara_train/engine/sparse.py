"""The sparse-trainable weight: unstructural backpropagation for one tensor.

``SparseUpdate`` is a ``torch.nn.utils.parametrize`` parametrization. The module keeps its own
weight tensor (frozen, original dtype); the trainable entries live in ``values``, a separate leaf
of shape ``[k]`` (fp32 masters by default). It hands the weight to the layer in one of two ways:

* **in place** (default): before a forward, the current ``values`` are written into the stored
  weight at ``flat_indices`` (only when they changed since the last write, so gradient
  checkpointing and gradient accumulation never touch a weight that autograd saved), and the
  weight is passed on as an alias, no copy. Exact for fp32 weights, and the usual fp32-master
  mixed precision for bf16/fp16 ones.
* **overlay** (``overlay_dtype`` set): the stored weight is never written; each forward makes the
  copy of the weight in ``overlay_dtype`` that a low-precision model casts to anyway and puts the
  trained values there. For weights stored in fp8 (or bf16/fp16) whose storage cannot hold a
  small update: the update, and the gradient reaching it, stay in the compute dtype.

In backward the layer's usual weight gradient is formed for this one layer only and just its
``k`` selected entries are kept: no dense gradient or optimizer state outlives the layer.

State per trainable entry: the value (4 bytes in fp32), its position row-compressed (~2 bytes,
``sara_train.engine.positions``) and the pretrained value (the weight's dtype), which can live off
the compute device (``base_device``): it is read only to form ΔP and to restore the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from . import positions
from .errors import SaRAError
from .layer_gradient import LayerGeometry, LayerWeightGradient


class _SparseWeight(torch.autograd.Function):
    """``weight`` (already holding ``values`` at ``update``'s positions) as an alias whose gradient
    flows to ``values`` only: ``grad_values = grad_weight.flatten()[update.flat_indices]``. The
    positions are saved compressed and expanded for this one layer in backward."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, weight: torch.Tensor, update: SparseUpdate) -> torch.Tensor:
        ctx.save_for_backward(update.columns, update.row_starts)
        ctx.shape = update.shape
        ctx.values_dtype = values.dtype
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weight: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        flat_indices = positions.expand(*ctx.saved_tensors, ctx.shape)
        grad_values = grad_weight.reshape(-1).index_select(0, flat_indices).to(ctx.values_dtype)
        return grad_values, None, None


class _SparseOverlay(torch.autograd.Function):
    """A copy of ``weight`` in ``dtype`` with ``update``'s frozen values and ``values`` in place;
    the gradient flows to ``values`` only (the stored weight is frozen)."""

    @staticmethod
    def forward(
        ctx, values: torch.Tensor, weight: torch.Tensor, update: SparseUpdate, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.save_for_backward(update.columns, update.row_starts)
        ctx.shape = update.shape
        ctx.values_dtype = values.dtype
        out = weight.detach().to(dtype, copy=True)
        flat = out.view(-1)
        flat[update.frozen_indices] = update.frozen_values.to(dtype)
        flat[update.flat_indices] = values.detach().to(dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        flat_indices = positions.expand(*ctx.saved_tensors, ctx.shape)
        grad_values = grad_out.reshape(-1).index_select(0, flat_indices).to(ctx.values_dtype)
        return grad_values, None, None, None


def probe_positions(flat_weight: torch.Tensor, flat_indices: torch.Tensor, probe_size: int) -> torch.Tensor:
    """Sorted int32 positions of the ``probe_size`` largest-|w| entries of a flattened base weight,
    excluding the trained ``flat_indices``: the base fingerprint a delta carries."""
    magnitudes = flat_weight.detach().float().abs()
    magnitudes[flat_indices] = -1.0  # trained entries are never probes
    unselected = flat_weight.numel() - flat_indices.numel()
    return magnitudes.topk(min(probe_size, unselected)).indices.sort().values.to(torch.int32)


def _empty_like_indices(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


BASE_BUFFERS = ("base_values", "frozen_base")
"""The buffers holding pretrained values: on ``base_device`` when one is given."""


class SparseUpdate(nn.Module):
    """Parametrization of one weight whose entries at ``flat_indices`` are trained.

    Buffers (all 1-D, ``k`` = trainable entries, ``f`` = learned entries frozen by re-selection):
      columns [k], row_starts int32 [rows + 1]: the sorted positions of the trainable entries,
        row-compressed (``sara_train.engine.positions``); ``flat_indices`` expands them (int32 [k])
      base_values   [k]        the pretrained values there (weight dtype; on ``base_device``)
      frozen_indices int32 [f], frozen_values fp32 [f], frozen_base [f] (weight dtype, on
        ``base_device``): entries no longer trained, the values they had when frozen, and the
        pretrained values there
      probe_indices int32 [p], probe_values fp32 [p]: largest-|w| entries of the base weight
        (never selected), the fingerprint a delta carries to recognise its base model
    Parameter:
      values        [k]        current values of the trainable entries (``values_dtype``)
    ``overlay_dtype``: None for the in-place mode, else the dtype of the overlay copy (module docstring).
    ``base_device``: None keeps the pretrained values with the rest; a device keeps them there
    (``module.to()`` leaves them), e.g. the CPU while training on a GPU.
    ``geometry``: set for a Linear/Conv2d weight whose gradient may come from the layer path
    (``sara_train.engine.layer_gradient``): on a CPU the forward then hands the layer a weight
    without gradient and the module's forward hook calls ``attach_layer_gradient``.

    ``state_dict()`` / ``load_state_dict()`` carry all of them, the positions as ``flat_indices``
    int32 [k]; loading accepts other sizes (a state saved after a progressive step) and resizes the
    buffers and ``values`` (a new Parameter). The weight itself is not part of this module:
    ``SaRAHandle.load_state_dict`` restores it. ``selection_version`` counts changes of the selected
    entries (progressive step, load), for caches keyed on them.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        flat_indices: torch.Tensor,
        values_dtype: torch.dtype = torch.float32,
        probe_size: int = 4,
        overlay_dtype: torch.dtype | None = None,
        base_device: torch.device | str | None = None,
        geometry: LayerGeometry | None = None,
    ) -> None:
        super().__init__()
        self.overlay_dtype = overlay_dtype
        self.geometry = geometry
        self._layer_gradient_pending = False
        self.base_device = None if base_device is None else torch.device(base_device)
        if not weight.is_contiguous():
            raise SaRAError(
                "SaRA needs contiguous weights (got a non-contiguous tensor, e.g. "
                "channels_last); call model.to(memory_format=torch.contiguous_format)"
            )
        flat = weight.detach().reshape(-1)
        self.shape = tuple(weight.shape)
        flat_indices = flat_indices.to(device=weight.device, dtype=torch.int32)
        columns, row_starts = positions.compress(flat_indices, self.shape)
        self.register_buffer("columns", columns)
        self.register_buffer("row_starts", row_starts)
        base_values = flat[flat_indices]
        self.values = nn.Parameter(base_values.to(values_dtype, copy=True))
        self.register_buffer("base_values", self._to_base_device(base_values.clone()))
        self.register_buffer("frozen_indices", _empty_like_indices(weight.device))
        self.register_buffer("frozen_values", torch.empty(0, dtype=torch.float32, device=weight.device))
        self.register_buffer("frozen_base", self.base_values[:0].clone())
        probe_indices = probe_positions(flat, flat_indices, probe_size)
        self.register_buffer("probe_indices", probe_indices)
        self.register_buffer("probe_values", flat[probe_indices.long()].float())
        self._synced_version: int | None = None
        self.selection_version = 0

    @property
    def flat_indices(self) -> torch.Tensor:
        """Sorted int32 [k] row-major positions of the trainable entries (expanded on each call)."""
        return positions.expand(self.columns, self.row_starts, self.shape)

    def _to_base_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.base_device is None else tensor.to(self.base_device)

    def _apply(self, fn, recurse: bool = True):
        """``module.to()`` and kin move everything but the pretrained values when ``base_device`` is set."""
        if self.base_device is None:
            return super()._apply(fn, recurse)
        kept = {name: self._buffers.pop(name) for name in BASE_BUFFERS}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._layer_gradient_pending = (
            self.geometry is not None
            and weight.device.type == "cpu"
            and torch.is_grad_enabled()
            and self.values.requires_grad
            and self.values.numel() > 0
        )
        if self.overlay_dtype is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self._layer_gradient_pending):
                return _SparseOverlay.apply(self.values, weight, self, self.overlay_dtype)
        if self.values.numel() == 0:
            return weight  # nothing trainable left: no weight gradient is computed at all
        self.write_values_into(weight)
        if self._layer_gradient_pending:
            return weight  # frozen: the layer forms no weight gradient; attach_layer_gradient does
        return _SparseWeight.apply(self.values, weight, self)

    def attach_layer_gradient(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The layer's output, carrying the gradient of ``values`` (``LayerWeightGradient``) if this
        forward handed the layer a weight without one; else ``output`` itself."""
        if not self._layer_gradient_pending:
            return output
        self._layer_gradient_pending = False
        return LayerWeightGradient.apply(
            output, inputs, self.values, self.columns, self.row_starts, self.shape, self.geometry
        )

    @torch.no_grad()
    def write_values_into(self, weight: torch.Tensor) -> None:
        """Copy ``values`` into ``weight`` at ``flat_indices`` if they changed since last time (the
        in-place mode; in the overlay mode the stored weight is never written)."""
        if self.overlay_dtype is not None or self.values._version == self._synced_version:
            return
        weight.view(-1)[self.flat_indices] = self.values.detach().to(weight.dtype)
        self._synced_version = self.values._version

    def values_changed(self) -> None:
        """Write ``values`` into the weight at the next forward even if autograd's version counter
        did not see them change (an optimizer kernel writing through a raw pointer)."""
        self._synced_version = None

    def delta_values(self) -> torch.Tensor:
        """``values - base_values`` in fp32, shape [k], on the values' device, differentiable to ``values``."""
        return self.values.float() - self.base_values.to(self.values.device, non_blocking=True).float()

    @torch.no_grad()
    def frozen_deltas(self) -> torch.Tensor:
        """``frozen_values - frozen_base`` in fp32, shape [f], on the values' device."""
        return self.frozen_values - self.frozen_base.to(self.frozen_values.device, non_blocking=True).float()

    @torch.no_grad()
    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All learned updates of this weight: ``(flat_indices int32 sorted, delta fp32)``."""
        indices = torch.cat([self.flat_indices, self.frozen_indices])
        deltas = torch.cat([self.delta_values(), self.frozen_deltas()])
        order = indices.argsort()
        return indices[order], deltas[order]

    @torch.no_grad()
    def reselect(self, weight: torch.Tensor, threshold: float) -> torch.Tensor:
        """Progressive step: keep training the entries with ``|value| < threshold``; freeze the rest
        with their learned values (they stay in ``weight`` and in ``frozen_values``).

        ``values`` becomes a new, smaller Parameter without a gradient (call this after an
        optimizer step); the caller moves optimizer state over. Returns the bool keep-mask over
        the old ``values`` ([k_old]).
        """
        self._synced_version = None
        self.write_values_into(weight)
        old = self.values
        keep = old.detach().abs() < threshold
        drop = ~keep
        flat_indices = self.flat_indices
        on_base = keep.to(self.base_values.device)
        self.frozen_indices = torch.cat([self.frozen_indices, flat_indices[drop]])
        self.frozen_values = torch.cat([self.frozen_values, old.detach().float()[drop]])
        self.frozen_base = torch.cat([self.frozen_base, self.base_values[~on_base]])
        self.columns, self.row_starts = positions.compress(flat_indices[keep], self.shape)
        self.base_values = self.base_values[on_base]
        self.values = nn.Parameter(old.detach()[keep].clone(), requires_grad=old.requires_grad)
        self._synced_version = self.values._version
        self.selection_version += 1
        return keep

    @torch.no_grad()
    def write_all_into(self, weight: torch.Tensor) -> None:
        """Write the frozen entries' values and the current ``values`` into ``weight`` in its dtype,
        as training in the in-place mode leaves them there (also used to merge at removal)."""
        flat = weight.view(-1)
        flat[self.frozen_indices] = self.frozen_values.to(weight.dtype)
        flat[self.flat_indices] = self.values.detach().to(weight.dtype)
        self._synced_version = self.values._version

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The positions go out as ``flat_indices`` int32 [k], a layout-free form."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        del destination[prefix + "columns"], destination[prefix + "row_starts"]
        destination[prefix + "flat_indices"] = self.flat_indices

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Compress the saved ``flat_indices``, and resize buffers and ``values`` to the saved sizes
        first, so ``load_state_dict`` accepts a state saved after re-selection (the shapes of the
        trainable and frozen sets change)."""
        saved_indices = state_dict.pop(prefix + "flat_indices", None)
        if saved_indices is not None:
            columns, row_starts = positions.compress(saved_indices.to(self.columns.device), self.shape)
            state_dict[prefix + "columns"], state_dict[prefix + "row_starts"] = columns, row_starts
        for name, buffer in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        saved = state_dict.get(prefix + "values")
        if saved is not None and saved.shape != self.values.shape:
            self.values = nn.Parameter(
                torch.empty(saved.shape, dtype=self.values.dtype, device=self.values.device),
                requires_grad=self.values.requires_grad,
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._synced_version = None
        self.selection_version += 1

    @torch.no_grad()
    def restore_base_into(self, weight: torch.Tensor) -> None:
        """Write the pretrained values back into ``weight`` at every entry this update ever trained,
        bit-exactly (the weight is as before injection); ``values`` are left as they are. (A no-op
        change in the overlay mode, where the stored weight was never written.)"""
        weight.view(-1)[self.flat_indices] = self.base_values.to(weight.device)
        weight.view(-1)[self.frozen_indices] = self.frozen_base.to(weight.device)
        self._synced_version = None
