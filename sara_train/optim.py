"""``SaRAAdamW``: the paper's one-line form, an AdamW built from the model that does selection,
the rank loss and the progressive re-selection itself, on top of ``inject``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import SaRAConfig
from .model import SaRAHandle, inject


class SaRAAdamW(torch.optim.AdamW):
    """AdamW over the SaRA values of ``model``.

    ``optimizer = SaRAAdamW(model, lr=1e-4, threshold=1e-3, rank_weight=1e-4, progressive_at=500)``
    then a plain loop (``loss.backward(); optimizer.step(); optimizer.zero_grad()``). Each ``step``
    first adds ``rank_weight * d||ΔP||_* / d values`` to the gradients (over ``rank_layers_per_step``
    layers, all by default), and after step number ``progressive_at`` re-selects the trainable
    entries keeping their Adam moments. ``optimizer.handle`` is the ``SaRAHandle``
    (``handle.delta()``, ``handle.remove()``).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, *, threshold: float | None = None,
                 budget: float | int | None = None, rank_weight: float = 0.0,
                 rank_layers_per_step: int | None = None, progressive_at: int | None = None,
                 config: SaRAConfig | None = None, **adamw_kwargs) -> None:
        if config is None:
            config = SaRAConfig(threshold=threshold, budget=budget)
        self.handle: SaRAHandle = inject(model, config)
        self.rank_weight = rank_weight
        self.rank_layers_per_step = rank_layers_per_step
        self.progressive_at = progressive_at
        self.steps_taken = 0
        self.last_rank_loss = 0.0
        super().__init__(list(self.handle.parameters()), lr=lr, **adamw_kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.rank_weight:
            self.last_rank_loss = float(self.handle.add_rank_loss_grad(self.rank_weight, self.rank_layers_per_step))
        super().step()
        self.steps_taken += 1
        if self.progressive_at is not None and self.steps_taken == self.progressive_at:
            self.handle.reselect(self)
        return loss
