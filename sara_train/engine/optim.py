"""``SaRAAdamW``: the paper's one-line form, an AdamW built from the model that does selection,
the rank loss and the progressive re-selection itself, on top of ``inject``. ``SaRAOptimizer`` is
that SaRA part, mixed into an Adam-family optimizer; ``sara_optimizer_class("8bit")`` gives the
same with 8-bit moments (``sara_train.engine.optim8bit``, needs bitsandbytes).

Weight decay here means decoupled decay of the *update* ΔP = values - pretrained values toward
zero (i.e. of the trained entries toward their pretrained values): each step first sets
``ΔP <- ΔP * (1 - lr * weight_decay)``, then takes the Adam step. torch's AdamW would instead
shrink the absolute weights toward zero, pulling the pretrained model itself away. The default is
0, so a step with a zero gradient leaves every weight unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .config import SaRAConfig
from .errors import SaRAError
from .handle import SaRAHandle, inject


def check_hyperparameters(
    lr: float, weight_decay: float, rank_weight: float, rank_layers_per_step: int | None, progressive_at: int | None
) -> None:
    """Raise ``SaRAError`` naming the first value that is not finite or out of range."""
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("rank_weight", rank_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SaRAError(f"SaRAAdamW: {name} must be a finite number >= 0, got {value!r}")
    for name, count in (("rank_layers_per_step", rank_layers_per_step), ("progressive_at", progressive_at)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise SaRAError(f"SaRAAdamW: {name} must be an int >= 1 or None, got {count!r}")


MOMENTS = ("fp32", "8bit")
"""How the optimizer keeps Adam's two moments: fp32 (8 bytes per entry, exact) or 8-bit block-wise
quantized (2 bytes per entry, bitsandbytes' AdamW8bit)."""


class SaRAOptimizer:
    """The SaRA part of an Adam-family optimizer over the SaRA values of ``model``; mix it in before
    a ``torch.optim.Optimizer`` subclass taking ``(params, lr=, weight_decay=, **kwargs)``.

    ``optimizer = SaRAAdamW(model, lr=1e-4, threshold=1e-3, rank_weight=1e-4, progressive_at=500)``
    then a plain loop (``loss.backward(); optimizer.step(); optimizer.zero_grad()``). Each ``step``
    first adds ``rank_weight * d||ΔP||_* / d values`` to the gradients (over ``rank_layers_per_step``
    layers, all by default), decays ΔP by ``weight_decay`` (see the module docstring; a group's
    ``"weight_decay"`` has that meaning), takes the Adam step, and after step number
    ``progressive_at`` re-selects the trainable entries keeping their Adam moments.
    ``optimizer.handle`` is the ``SaRAHandle`` (``handle.delta()``, ``handle.remove()``).

    Hyperparameters are checked before the model is touched, and if building the optimizer fails
    after injection the model is restored, so a failure leaves ``model`` as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        *,
        threshold: float | None = None,
        budget: float | int | None = None,
        rank_weight: float = 0.0,
        rank_layers_per_step: int | None = None,
        progressive_at: int | None = None,
        weight_decay: float = 0.0,
        config: SaRAConfig | None = None,
        **optimizer_kwargs,
    ) -> None:
        check_hyperparameters(lr, weight_decay, rank_weight, rank_layers_per_step, progressive_at)
        if config is None:
            config = SaRAConfig(threshold=threshold, budget=budget)
        self.handle: SaRAHandle = inject(model, config)
        try:
            super().__init__(list(self.handle.parameters()), lr=lr, weight_decay=weight_decay, **optimizer_kwargs)
        except BaseException:
            self.handle.remove(merge=False)
            raise
        self.rank_weight = rank_weight
        self.rank_layers_per_step = rank_layers_per_step
        self.progressive_at = progressive_at
        self.steps_taken = 0
        self.last_rank_loss = 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.rank_weight:
            self.last_rank_loss = float(self.handle.add_rank_loss_grad(self.rank_weight, self.rank_layers_per_step))
        self._decay_updates()
        decays = [group["weight_decay"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["weight_decay"] = 0.0  # applied to ΔP above, not to the absolute weights
            super().step()
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay
        self.steps_taken += 1
        if self.progressive_at is not None and self.steps_taken == self.progressive_at:
            self.reselect()
        return loss

    def reselect(self) -> None:
        """The progressive step (``SaRAHandle.reselect``), moving this optimizer's state along."""
        self.handle.reselect(self)

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW state (moments per value tensor, hyperparameters) plus ``"sara"``: the
        handle's state and the step count (for the progressive step)."""
        state = super().state_dict()
        state["sara"] = {"handle": self.handle.state_dict(), "steps_taken": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output into a SaRAAdamW freshly built on the same base model: the
        selection (also after a progressive step), values, frozen entries, Adam moments and counters,
        so training continues bit-identically. Raises ``SaRAError`` for another model or base."""
        state = dict(state_dict)
        sara = state.pop("sara")
        self.handle.load_state_dict(sara["handle"])
        if len(self.param_groups) != 1:
            raise SaRAError("SaRAAdamW.load_state_dict expects the optimizer's one parameter group")
        self.state.clear()
        self.param_groups[0]["params"] = list(self.handle.parameters())  # the values are new Parameters
        super().load_state_dict(state)
        self.steps_taken = int(sara["steps_taken"])

    def _decay_updates(self) -> None:
        """``values <- base + (values - base) * (1 - lr * weight_decay)`` for every group with decay."""
        update_of = {id(update.values): update for update in self.handle.layers.values()}
        for group in self.param_groups:
            decay = group["weight_decay"] * group["lr"]
            if not decay:
                continue
            for values in group["params"]:
                update = update_of.get(id(values))
                if update is not None:
                    values.sub_(decay * update.delta_values().to(values.dtype))


class SaRAAdamW(SaRAOptimizer, torch.optim.AdamW):
    """``SaRAOptimizer`` on torch's AdamW: fp32 moments, 8 bytes per trainable entry."""


def sara_optimizer_class(moments: str) -> type[SaRAOptimizer]:
    """The SaRA optimizer keeping Adam's moments as ``moments`` (one of ``MOMENTS``)."""
    if moments == "fp32":
        return SaRAAdamW
    if moments == "8bit":
        try:
            from .optim8bit import SaRAAdamW8bit
        except ImportError as error:
            raise SaRAError(f"8-bit optimizer moments need bitsandbytes ({error}); pip install bitsandbytes") from None
        return SaRAAdamW8bit
    raise SaRAError(f"optimizer moments must be one of {', '.join(MOMENTS)}, got {moments!r}")
