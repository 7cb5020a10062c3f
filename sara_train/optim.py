"""``SaRAAdamW``: the paper's one-line form, an AdamW built from the model that does selection,
the rank loss and the progressive re-selection itself, on top of ``inject``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import SaRAConfig
from .errors import SaRAError
from .model import SaRAHandle, inject
from .rank_loss import nuclear_norm_and_grad
from .sparse import SparseUpdate


class SaRAAdamW(torch.optim.AdamW):
    """AdamW over the SaRA values of ``model``.

    ``optimizer = SaRAAdamW(model, lr=1e-4, threshold=1e-3, rank_weight=1e-4, progressive_at=500)``
    then a plain loop (``loss.backward(); optimizer.step(); optimizer.zero_grad()``). Each ``step``
    adds ``rank_weight * d||ΔP||_* / d values`` to the gradients (over ``rank_layers_per_step``
    layers in rotation, all by default) before the AdamW update, and after step number
    ``progressive_at`` re-selects the trainable entries keeping their Adam moments.
    ``optimizer.handle`` is the ``SaRAHandle`` (``handle.delta()``, ``handle.remove()``).

    ``step_in_backward=True`` updates each layer's values inside ``backward()`` as soon as their
    gradient exists and drops that gradient, so no gradient buffers for all values live at once;
    ``step()`` then only does the bookkeeping. Same result as the default, except that it cannot
    be combined with gradient accumulation, gradient clipping or DDP (which need all gradients).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, *, threshold: float | None = None,
                 budget: float | int | None = None, rank_weight: float = 0.0,
                 rank_layers_per_step: int | None = None, progressive_at: int | None = None,
                 step_in_backward: bool = False, config: SaRAConfig | None = None, **adamw_kwargs) -> None:
        if config is None:
            config = SaRAConfig(threshold=threshold, budget=budget)
        self.handle: SaRAHandle = inject(model, config)
        self.rank_weight = rank_weight
        self.rank_layers_per_step = rank_layers_per_step
        self.progressive_at = progressive_at
        self.step_in_backward = step_in_backward
        self.steps_taken = 0
        self.last_rank_loss = 0.0
        super().__init__(list(self.handle.parameters()), lr=lr, **adamw_kwargs)
        self._backward_hooks: list = []
        self._rank_layers_next: dict[int, tuple[SparseUpdate, float]] = {}
        if step_in_backward:
            self._prepare_backward_steps()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.step_in_backward:
            if self.rank_weight:
                self.last_rank_loss = float(self.handle.add_rank_loss_grad(self.rank_weight, self.rank_layers_per_step))
            super().step()
        if self.step_in_backward:
            self.last_rank_loss = self._rank_loss_in_backward
        self.steps_taken += 1
        if self.progressive_at is not None and self.steps_taken == self.progressive_at:
            self.handle.reselect(self)
        if self.step_in_backward:
            self._prepare_backward_steps()
        return loss

    # ----------------------------------------------------------------- update inside backward
    def _prepare_backward_steps(self) -> None:
        """Hook every values tensor for the next backward and pick its rank-loss layers."""
        for hook in self._backward_hooks:
            hook.remove()
        self._backward_hooks = [p.register_post_accumulate_grad_hook(self._step_one)
                                for p in self.handle.parameters()]
        self._rank_layers_next = {}
        self._rank_loss_in_backward = 0.0
        if self.rank_weight:
            chosen, scale = self.handle.next_rank_layers(self.rank_layers_per_step)
            self._rank_layers_next = {id(update.values): (update, scale) for update in chosen}

    @torch.no_grad()
    def _step_one(self, param: torch.Tensor) -> None:
        """AdamW update of one values tensor, called by autograd once its gradient is complete."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise SaRAError("step_in_backward: a values tensor is not in the optimizer")
        rank = self._rank_layers_next.pop(id(param), None)
        if rank is not None:
            update, scale = rank
            norm, grad = nuclear_norm_and_grad(update)
            param.grad += (self.rank_weight * scale) * grad.to(param.dtype)
            self._rank_loss_in_backward += scale * float(norm)
        others = [(p, p.grad) for group in self.param_groups for p in group["params"] if p is not param]
        for p, _ in others:
            p.grad = None
        super().step()
        for p, grad in others:
            p.grad = grad
        param.grad = None
