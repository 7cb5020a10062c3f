"""``SparseEMA``: an exponential moving average of SaRA's learned update, on the selected entries only.

The average is of ΔP (learned value - pretrained value), started at 0: the same as an EMA of the
weights started at the pretrained weights, as diffusers' ``EMAModel`` does, but 4 bytes per selected
entry instead of a dense copy of the model. Entries frozen by the progressive step keep being
averaged (their ΔP is then constant), so the EMA delta covers the same entries as ``handle.delta()``.
"""

from __future__ import annotations

from typing import Any

import torch

from .delta import SparseDelta
from .errors import SaRAError
from .handle import SaRAHandle


class SparseEMA:
    """``ema.update()`` after each optimizer step: ``average <- decay * average + (1 - decay) * ΔP``
    per selected entry. ``ema.delta()`` is the averaged update as a ``SparseDelta`` (load it like
    any delta); ``state_dict`` / ``load_state_dict`` resume it exactly."""

    def __init__(self, handle: SaRAHandle, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise SaRAError(f"EMA decay must be in (0, 1), got {decay}")
        self.handle = handle
        self.decay = decay
        self.updates = 0
        self.averages: dict[str, torch.Tensor] = {
            name: torch.zeros(update.values.numel() + update.frozen_indices.numel(), device=update.values.device)
            for name, update in handle.layers.items()
        }
        """Per layer, float32 [selected entries] in the order of ``handle.delta()``'s indices (sorted)."""
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}
        """Per layer: (the update's ``selection_version``, the permutation sorting its trainable and
        frozen indices together); recomputed only when the progressive step or a resume changes them."""

    @torch.no_grad()
    def update(self) -> None:
        for name, update in self.handle.layers.items():
            cached = self._orders.get(name)
            if cached is None or cached[0] != update.selection_version:
                order = torch.cat([update.flat_indices, update.frozen_indices]).argsort()
                cached = self._orders[name] = (update.selection_version, order)
            deltas = torch.cat([update.delta_values(), update.frozen_deltas()])[cached[1]]
            self.averages[name].mul_(self.decay).add_(deltas.to(self.averages[name].device), alpha=1 - self.decay)
        self.updates += 1

    def delta(self, dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None) -> SparseDelta:
        """The averaged update, with the entries, fingerprint and selection of ``handle.delta()``."""
        extra = {"ema_decay": str(self.decay), "ema_updates": str(self.updates)}
        return self.handle.delta(dtype, {**(metadata or {}), **extra}, values=self.averages)

    def state_dict(self) -> dict[str, Any]:
        return {"averages": dict(self.averages), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output taken on the same selection; ``SaRAError`` otherwise."""
        averages = state["averages"]
        if set(averages) != set(self.averages) or any(
            averages[name].shape != self.averages[name].shape for name in self.averages
        ):
            raise SaRAError("the saved EMA does not match this model's SaRA layers (another model or selection)")
        if float(state["decay"]) != self.decay:
            raise SaRAError(f"the saved EMA has decay {float(state['decay'])}, not {self.decay}")
        for name, average in averages.items():
            self.averages[name].copy_(average)
        self.updates = int(state["updates"])
