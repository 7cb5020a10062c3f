"""Looking at a model before choosing a budget: the |w| histogram, budget -> threshold, and
what zeroing the small weights does to the output.

The histogram is the paper's Fig. 2a: most pretrained weights are far from zero, and a budget of
a few percent picks a threshold in the thin tail near zero. ``zero_small_weights_effect`` is its
Sec. 3.1 check: setting those weights to zero barely changes the model's output, so they are
"ineffective" parameters free to be retrained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .apply import RestorePoint
from .config import SaRAConfig
from .errors import SaRAError
from .selection import budget_to_count, find_targets, kth_smallest_magnitude, next_float_above

LOG10_RANGE = (-8.0, 1.0)


def parse_budgets(text: str) -> list[float]:
    """``"0.01, 0.05"`` (commas or semicolons) -> ``[0.01, 0.05]``; ``SaRAError`` unless every
    budget is a fraction in (0, 1]."""
    try:
        budgets = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise SaRAError(f"budgets must be comma-separated fractions like 0.01, 0.05; got {text!r}") from None
    if not budgets or not all(0.0 < budget <= 1.0 for budget in budgets):
        raise SaRAError(f"budgets must be fractions in (0, 1], got {text!r}")
    return budgets


def threshold_for_budget(weights: Sequence[torch.Tensor], budget: float | int) -> float:
    """The threshold SaRA uses for ``budget`` over ``weights`` (every selected entry has |w| below it)."""
    total = sum(w.numel() for w in weights)
    return next_float_above(kth_smallest_magnitude(weights, budget_to_count(budget, total)).value)


@dataclass(frozen=True)
class BudgetRow:
    """A budget, the threshold SaRA derives from it, and the entries it selects (count, fraction)."""

    budget: float | int
    threshold: float
    entries: int
    fraction: float


def budget_threshold_table(weights: Sequence[torch.Tensor], budgets: Iterable[float | int]) -> list[BudgetRow]:
    """One ``BudgetRow`` per budget (a fraction in (0, 1] or a count) over all entries of ``weights``."""
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    rows = []
    for budget in budgets:
        entries = budget_to_count(budget, total)
        rows.append(BudgetRow(budget, threshold_for_budget(weights, budget), entries, entries / total))
    return rows


@dataclass(frozen=True)
class ZeroingRow:
    """The model with every targeted entry ``|w| < threshold`` set to zero.

    ``zeroed_entries`` / ``zeroed_fraction``: how many targeted entries that is (count, share).
    ``relative_change``: ``||f_zeroed(x) - f(x)|| / ||f(x)||`` over the whole output of ``run``.
    """

    threshold: float
    zeroed_entries: int
    zeroed_fraction: float
    relative_change: float


@torch.no_grad()
def zero_small_weights_effect(
    model: nn.Module, run: Callable[[nn.Module], torch.Tensor], thresholds: Sequence[float], config: SaRAConfig
) -> list[ZeroingRow]:
    """For each threshold: zero the targeted entries below it, call ``run(model)``, compare with the
    unchanged output, put the weights back. One ``ZeroingRow`` per threshold, in order.

    Targets are ``config``'s (types, include/exclude; its budget/threshold are not used). ``run``
    must be deterministic (fixed inputs, eval mode) for the comparison to mean anything. The
    weights are restored bit-exactly after every threshold, also when ``run`` raises. Extra memory:
    the zeroed entries' positions and old values (12 bytes each). Raises ``SaRAError`` if the
    unchanged output is all zeros.
    """
    targets = find_targets(model, config)
    weights = [getattr(target.module, target.param_name) for target in targets]
    total = sum(w.numel() for w in weights)
    reference = run(model).double()
    reference_norm = float(reference.norm())
    if reference_norm == 0.0:
        raise SaRAError("the model's output is all zeros: a relative change is undefined")
    rows = []
    for threshold in thresholds:
        restore_point = RestorePoint()
        try:
            zeroed = 0
            for weight in weights:
                positions = (weight.detach().reshape(-1).float().abs() < threshold).nonzero().squeeze(1)
                restore_point.remember(weight, positions)
                weight.view(-1)[positions] = 0
                zeroed += positions.numel()
            change = float((run(model).double() - reference).norm()) / reference_norm
        finally:
            restore_point.restore()
        rows.append(ZeroingRow(float(threshold), zeroed, zeroed / total, change))
    return rows


def magnitude_histogram(weights: Iterable[torch.Tensor], bins: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edges [bins+1], counts [bins])`` of log10|w| over ``LOG10_RANGE``; exact zeros and tinier
    magnitudes fall in the first bin. One tensor at a time."""
    low, high = LOG10_RANGE
    counts = torch.zeros(bins, dtype=torch.float64)
    for w in weights:
        logs = w.detach().reshape(-1).float().abs().clamp_min(10.0**low).log10().clamp_max(high)
        counts += torch.histc(logs, bins=bins, min=low, max=high).double().cpu()
    return torch.linspace(low, high, bins + 1), counts
