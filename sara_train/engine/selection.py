"""Which entries SaRA trains: target discovery and threshold/budget selection.

Selection works on float32 bit patterns: for non-negative floats the int32 bit pattern is ordered
like the value, so the global k-th smallest |w| is found exactly with two histogram passes over the
weights (top 16 bits, then low 16 bits inside the one bucket that holds k), one tensor at a time and
never concatenating the weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import NORM_TYPES, SaRAConfig
from .errors import SaRAError

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Target:
    """One targeted tensor: ``getattr(module, param_name)`` is the weight, ``name`` its full key."""

    name: str
    module: nn.Module
    param_name: str


def find_targets(model: nn.Module, config: SaRAConfig) -> list[Target]:
    """The tensors of ``model`` that SaRA may train, in ``named_modules`` order.

    Raises ``SaRAError`` if nothing matches. A tensor shared by several modules is targeted once.
    """
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    targets: list[Target] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if include and not any(p.search(module_name) for p in include):
            continue
        if any(p.search(module_name) for p in exclude):
            continue
        if isinstance(module, config.target_types):
            param_names = ["weight", "bias"] if config.include_bias else ["weight"]
        elif config.include_norm and isinstance(module, NORM_TYPES):
            param_names = ["weight", "bias"]
        else:
            continue
        for param_name in param_names:
            if parametrize.is_parametrized(module, param_name):
                raise SaRAError(f"{module_name}.{param_name} is already parametrized (SaRA injected twice?)")
            param = module._parameters.get(param_name)
            if param is None or id(param) in seen or not param.is_floating_point():
                continue
            if param.numel() > INT32_MAX:
                raise SaRAError(
                    f"{module_name}.{param_name} has {param.numel()} entries; "
                    "int32 flat indices address at most 2**31-1"
                )
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            targets.append(Target(full_name, module, param_name))
    if not targets:
        raise SaRAError(
            f"no tensors to train: no module matches target_types="
            f"{[t.__name__ for t in config.target_types]}, include={config.include}, "
            f"exclude={config.exclude}"
        )
    return targets


def _magnitude_bits(weight: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|weight|`` as float32, flattened; ordered like the magnitudes."""
    return weight.detach().reshape(-1).float().abs().view(torch.int32)


@dataclass(frozen=True)
class BudgetCut:
    """Result of ``kth_smallest_magnitude``: the k-th smallest |w| and how many are strictly below."""

    value_bits: int
    count_below: int

    @property
    def value(self) -> float:
        return torch.tensor(self.value_bits, dtype=torch.int32).view(torch.float32).item()


def kth_smallest_magnitude(weights: Iterable[torch.Tensor], k: int) -> BudgetCut:
    """Exact global k-th smallest ``|w|`` (1-based) over all entries of ``weights``.

    ``weights`` is iterated twice (pass a list). Memory: a few temporaries the size of one tensor.
    """
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    if not 1 <= k <= total:
        raise SaRAError(f"budget of {k} entries is outside [1, {total}] targeted entries")
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for w in weights:
        high += torch.bincount(_magnitude_bits(w) >> 16, minlength=1 << 16).cpu()
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below_bucket = int(cumulative[bucket - 1]) if bucket > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for w in weights:
        bits = _magnitude_bits(w)
        in_bucket = bits[(bits >> 16) == bucket]
        low += torch.bincount(in_bucket & 0xFFFF, minlength=1 << 16).cpu()
    low_cumulative = low.cumsum(0)
    offset = int(torch.searchsorted(low_cumulative, k - below_bucket))
    below = below_bucket + (int(low_cumulative[offset - 1]) if offset > 0 else 0)
    return BudgetCut(value_bits=(bucket << 16) | offset, count_below=below)


def budget_to_count(budget: float | int, total: int) -> int:
    """Entries a budget asks for: a float is a fraction of ``total`` (rounded, at least 1)."""
    if isinstance(budget, float):
        return max(1, min(total, round(budget * total)))
    return min(int(budget), total)


def next_float_above(value: float) -> float:
    """The smallest float32 strictly greater than ``value`` (so ``|w| < result`` includes value)."""
    return torch.nextafter(
        torch.tensor(value, dtype=torch.float32), torch.tensor(math.inf, dtype=torch.float32)
    ).item()


def select_entries(
    weights: Mapping[str, torch.Tensor], config: SaRAConfig
) -> tuple[float | None, dict[str, torch.Tensor]]:
    """Choose the trainable entries of each weight.

    Returns ``(threshold, flat_indices)``: ``flat_indices[name]`` is a sorted int32 tensor of
    row-major positions (weights with no selected entry are left out). Threshold mode selects
    exactly ``|w| < threshold``; budget mode selects exactly k entries. For ``config.selection``
    "smallest" those are all with ``|w|`` below the k-th smallest magnitude plus, among the entries
    equal to it, the first ones in ``weights`` order, and every selected entry has ``|w| <
    threshold``; "largest" selects the complement of the smallest ``total - k``; "random" the k
    smallest of seeded uniform scores. Those two have no threshold (None is returned).
    """
    flat_indices: dict[str, torch.Tensor] = {}

    def keep(name: str, mask: torch.Tensor) -> None:
        positions = mask.nonzero().squeeze(1)
        if positions.numel():
            flat_indices[name] = positions.to(torch.int32)

    if config.threshold is not None:
        threshold = float(config.threshold)
        for name, w in weights.items():
            keep(name, w.detach().reshape(-1).float().abs() < threshold)
        return threshold, flat_indices
    total = sum(w.numel() for w in weights.values())
    k = budget_to_count(config.budget, total)
    if config.selection == "largest":
        for name, mask in _smallest_masks(weights, total - k):
            keep(name, ~mask)
        return None, flat_indices
    if config.selection == "random":
        generator = torch.Generator().manual_seed(config.selection_seed)
        scores = {name: torch.rand(w.numel(), generator=generator).to(w.device) for name, w in weights.items()}
        for name, mask in _smallest_masks(scores, k):
            keep(name, mask)
        return None, flat_indices
    cut = kth_smallest_magnitude(weights.values(), k)
    for name, mask in _smallest_masks(weights, k, cut):
        keep(name, mask)
    return next_float_above(cut.value), flat_indices


def _smallest_masks(
    weights: Mapping[str, torch.Tensor], k: int, cut: BudgetCut | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, flat bool mask)`` per weight, together marking exactly the ``k`` (0 <= k <= total)
    smallest ``|w|``: all below the k-th smallest, then ties in ``weights`` order. ``cut`` is
    ``kth_smallest_magnitude(weights.values(), k)`` when the caller already has it."""
    if k == 0:
        for name, w in weights.items():
            yield name, torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        return
    cut = cut or kth_smallest_magnitude(weights.values(), k)
    ties_left = k - cut.count_below
    for name, w in weights.items():
        bits = _magnitude_bits(w)
        mask = bits < cut.value_bits
        if ties_left > 0:
            ties = (bits == cut.value_bits).nonzero().squeeze(1)[:ties_left]
            mask[ties] = True
            ties_left -= ties.numel()
        yield name, mask
