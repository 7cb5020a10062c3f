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
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SaRAError


class _SparseWeight(torch.autograd.Function):
    """``weight`` (already holding ``values`` at ``flat_indices``) as an alias whose gradient
    flows to ``values`` only: ``grad_values = grad_weight.flatten()[flat_indices]``."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, weight: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat_indices)
        ctx.values_dtype = values.dtype
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weight: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (flat_indices,) = ctx.saved_tensors
        grad_values = grad_weight.reshape(-1).index_select(0, flat_indices).to(ctx.values_dtype)
        return grad_values, None, None


class _SparseOverlay(torch.autograd.Function):
    """A copy of ``weight`` in ``dtype`` with ``frozen_values`` at ``frozen_indices`` and ``values`` at
    ``flat_indices``; the gradient flows to ``values`` only (the stored weight is frozen)."""

    @staticmethod
    def forward(
        ctx,
        values: torch.Tensor,
        weight: torch.Tensor,
        flat_indices: torch.Tensor,
        frozen_indices: torch.Tensor,
        frozen_values: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.save_for_backward(flat_indices)
        ctx.values_dtype = values.dtype
        out = weight.detach().to(dtype, copy=True)
        flat = out.view(-1)
        flat[frozen_indices] = frozen_values.to(dtype)
        flat[flat_indices] = values.detach().to(dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        (flat_indices,) = ctx.saved_tensors
        grad_values = grad_out.reshape(-1).index_select(0, flat_indices).to(ctx.values_dtype)
        return grad_values, None, None, None, None, None


def probe_positions(flat_weight: torch.Tensor, flat_indices: torch.Tensor, probe_size: int) -> torch.Tensor:
    """Sorted int32 positions of the ``probe_size`` largest-|w| entries of a flattened base weight,
    excluding the trained ``flat_indices``: the base fingerprint a delta carries."""
    magnitudes = flat_weight.detach().float().abs()
    magnitudes[flat_indices] = -1.0  # trained entries are never probes
    unselected = flat_weight.numel() - flat_indices.numel()
    return magnitudes.topk(min(probe_size, unselected)).indices.sort().values.to(torch.int32)


def _empty_like_indices(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


class SparseUpdate(nn.Module):
    """Parametrization of one weight whose entries at ``flat_indices`` are trained.

    Buffers (all 1-D, ``k`` = trainable entries, ``f`` = learned entries frozen by re-selection):
      flat_indices  int32 [k]  sorted row-major positions of the trainable entries
      base_values   [k]        the pretrained values there (weight dtype)
      frozen_indices int32 [f], frozen_values fp32 [f], frozen_base [f] (weight dtype): entries no
        longer trained, the values they had when frozen, and the pretrained values there
      probe_indices int32 [p], probe_values fp32 [p]: largest-|w| entries of the base weight
        (never selected), the fingerprint a delta carries to recognise its base model
    Parameter:
      values        [k]        current values of the trainable entries (``values_dtype``)
    ``overlay_dtype``: None for the in-place mode, else the dtype of the overlay copy (module docstring).

    ``state_dict()`` / ``load_state_dict()`` carry all of them; loading accepts other sizes (a
    state saved after a progressive step) and resizes the buffers and ``values`` (a new Parameter).
    The weight itself is not part of this module: ``SaRAHandle.load_state_dict`` restores it.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        flat_indices: torch.Tensor,
        values_dtype: torch.dtype = torch.float32,
        probe_size: int = 4,
        overlay_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.overlay_dtype = overlay_dtype
        if not weight.is_contiguous():
            raise SaRAError(
                "SaRA needs contiguous weights (got a non-contiguous tensor, e.g. "
                "channels_last); call model.to(memory_format=torch.contiguous_format)"
            )
        flat = weight.detach().reshape(-1)
        self.shape = tuple(weight.shape)
        self.register_buffer("flat_indices", flat_indices.to(device=weight.device, dtype=torch.int32))
        self.register_buffer("base_values", flat[self.flat_indices].clone())
        self.values = nn.Parameter(self.base_values.to(values_dtype, copy=True))
        self.register_buffer("frozen_indices", _empty_like_indices(weight.device))
        self.register_buffer("frozen_values", torch.empty(0, dtype=torch.float32, device=weight.device))
        self.register_buffer("frozen_base", self.base_values[:0].clone())
        probe_indices = probe_positions(flat, self.flat_indices, probe_size)
        self.register_buffer("probe_indices", probe_indices)
        self.register_buffer("probe_values", flat[probe_indices.long()].float())
        self._synced_version: int | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.overlay_dtype is not None:
            return _SparseOverlay.apply(
                self.values, weight, self.flat_indices, self.frozen_indices, self.frozen_values, self.overlay_dtype
            )
        if self.values.numel() == 0:
            return weight  # nothing trainable left: no weight gradient is computed at all
        self.write_values_into(weight)
        return _SparseWeight.apply(self.values, weight, self.flat_indices)

    @torch.no_grad()
    def write_values_into(self, weight: torch.Tensor) -> None:
        """Copy ``values`` into ``weight`` at ``flat_indices`` if they changed since last time (the
        in-place mode; in the overlay mode the stored weight is never written)."""
        if self.overlay_dtype is not None or self.values._version == self._synced_version:
            return
        weight.view(-1)[self.flat_indices] = self.values.detach().to(weight.dtype)
        self._synced_version = self.values._version

    def delta_values(self) -> torch.Tensor:
        """``values - base_values`` in fp32, shape [k], differentiable to ``values``."""
        return self.values.float() - self.base_values.float()

    @torch.no_grad()
    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All learned updates of this weight: ``(flat_indices int32 sorted, delta fp32)``."""
        indices = torch.cat([self.flat_indices, self.frozen_indices])
        deltas = torch.cat([self.delta_values(), self.frozen_values - self.frozen_base.float()])
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
        self.frozen_indices = torch.cat([self.frozen_indices, self.flat_indices[drop]])
        self.frozen_values = torch.cat([self.frozen_values, old.detach().float()[drop]])
        self.frozen_base = torch.cat([self.frozen_base, self.base_values[drop]])
        self.flat_indices = self.flat_indices[keep]
        self.base_values = self.base_values[keep]
        self.values = nn.Parameter(old.detach()[keep].clone(), requires_grad=old.requires_grad)
        self._synced_version = self.values._version
        return keep

    @torch.no_grad()
    def write_all_into(self, weight: torch.Tensor) -> None:
        """Write the frozen entries' values and the current ``values`` into ``weight`` in its dtype,
        as training in the in-place mode leaves them there (also used to merge at removal)."""
        flat = weight.view(-1)
        flat[self.frozen_indices] = self.frozen_values.to(weight.dtype)
        flat[self.flat_indices] = self.values.detach().to(weight.dtype)
        self._synced_version = self.values._version

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Resize buffers and ``values`` to the saved sizes first, so ``load_state_dict`` accepts a
        state saved after re-selection (the shapes of the trainable and frozen sets change)."""
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

    @torch.no_grad()
    def restore_base_into(self, weight: torch.Tensor) -> None:
        """Write the pretrained values back into ``weight`` at every entry this update ever trained,
        bit-exactly (the weight is as before injection); ``values`` are left as they are. (A no-op
        change in the overlay mode, where the stored weight was never written.)"""
        weight.view(-1)[self.flat_indices] = self.base_values
        weight.view(-1)[self.frozen_indices] = self.frozen_base
        self._synced_version = None
