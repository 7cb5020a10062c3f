"""Injection: turn chosen weights of any ``nn.Module`` into sparse-trainable ones, and back.

``inject(model, config)`` returns a ``SaRAHandle``, the one object a training loop talks to:
``parameters()`` for the optimizer, ``rank_loss()``, ``reselect()``, ``delta()``, ``remove()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import SaRAConfig
from .delta import LayerDelta, SparseDelta
from .errors import SaRAError
from .layer_gradient import layer_geometry
from .rank_loss import nuclear_norm, nuclear_norm_and_grad
from .selection import Target, find_targets, select_entries
from .sparse import SparseUpdate


def inject(model: nn.Module, config: SaRAConfig | None = None) -> SaRAHandle:
    """Make the smallest-|w| entries of ``model``'s targeted weights trainable, in place.

    Every parameter of ``model`` gets ``requires_grad=False``; only the handle's sparse values
    train. The model stays a plain module with the same forward; ``handle.remove()`` undoes it all.
    Raises ``SaRAError`` when nothing is targeted or selected; if injection fails part way, the
    model is left exactly as it was.
    """
    config = config or SaRAConfig()
    targets = find_targets(model, config)
    weights = {t.name: getattr(t.module, t.param_name) for t in targets}
    threshold, flat_indices = select_entries(weights, config)
    if not flat_indices:
        smallest = min(float(w.detach().float().abs().min()) for w in weights.values())
        raise SaRAError(
            f"threshold {threshold:g} selects no entries: the smallest |w| of the targeted weights "
            f"is {smallest:g}; raise the threshold or give a budget"
        )
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    num_targeted = sum(w.numel() for w in weights.values())
    handle = SaRAHandle(model, config, threshold, requires_grad, num_targeted)
    try:
        model.requires_grad_(False)
        for target in targets:
            if target.name not in flat_indices:
                continue
            geometry = layer_geometry(target.module, target.param_name) if config.weight_gradient == "auto" else None
            update = SparseUpdate(
                weights[target.name],
                flat_indices[target.name],
                config.values_dtype,
                config.probe_size,
                config.overlay_dtype,
                config.base_device,
                geometry,
            )
            parametrize.register_parametrization(target.module, target.param_name, update, unsafe=True)
            handle.add_layer(target, update)
    except BaseException:
        handle.remove(merge=False)
        raise
    return handle


class SaRAHandle:
    """Live SaRA state of one model (made by ``inject``). ``layers`` maps weight key -> ``SparseUpdate``;
    ``requires_grad`` holds the model's flags from before injection, restored by ``remove()``."""

    def __init__(
        self,
        model: nn.Module,
        config: SaRAConfig,
        threshold: float | None,
        requires_grad: dict[str, bool],
        num_targeted: int,
    ) -> None:
        self.model = model
        self.config = config
        self.threshold = threshold
        self._targets: dict[str, Target] = {}
        self.layers: dict[str, SparseUpdate] = {}
        self._requires_grad = requires_grad
        self._rank_cursor = 0
        self._pending_swaps: dict[int, tuple[nn.Parameter, nn.Parameter, torch.Tensor]] = {}
        self._step_hook = None
        self._layer_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.removed = False
        self.num_targeted = num_targeted
        """Entries of all targeted weights (the denominator of a fractional budget)."""

    def add_layer(self, target: Target, update: SparseUpdate) -> None:
        """Record a weight that ``inject`` has just parametrized with ``update`` (and hook its module's
        output when ``update`` may take its gradient from the layer)."""
        self._targets[target.name] = target
        self.layers[target.name] = update
        if update.geometry is not None:
            hook = target.module.register_forward_hook(
                lambda module, args, output: update.attach_layer_gradient(args[0], output)
            )
            self._layer_hooks.append(hook)

    # ----------------------------------------------------------------- parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(weight key, values)`` for every layer: the only trainable tensors."""
        for name, update in self.layers.items():
            yield name, update.values

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, values in self.named_parameters():
            yield values

    def values_changed(self) -> None:
        """Call after changing the values where autograd's version counter does not see it (e.g. a
        bitsandbytes optimizer kernel): the next forward writes them into the weights."""
        for update in self.layers.values():
            update.values_changed()

    @property
    def num_trainable(self) -> int:
        return sum(update.values.numel() for update in self.layers.values())

    def weight(self, name: str) -> torch.Tensor:
        """The module's own (frozen) weight tensor for key ``name``; it holds the trained values."""
        target = self._targets[name]
        return target.module.parametrizations[target.param_name].original

    # ----------------------------------------------------------------- rank loss
    def next_rank_layers(self, layers_per_step: int | None) -> tuple[list[SparseUpdate], float]:
        """The layers whose rank loss is taken this call, and the factor that keeps the expected
        total unchanged when only ``layers_per_step`` layers (round-robin) are taken."""
        active = [update for update in self.layers.values() if update.values.numel()]
        if not layers_per_step or layers_per_step >= len(active):
            return active, 1.0
        start = self._rank_cursor % len(active)
        chosen = (active + active)[start : start + layers_per_step]
        self._rank_cursor = start + layers_per_step
        return chosen, len(active) / layers_per_step

    def rank_loss(self, layers_per_step: int | None = None) -> torch.Tensor:
        """Sum of the nuclear norms ``||ΔP||_*`` of the layers' sparse updates (0-d fp32 tensor,
        differentiable to the values). ``layers_per_step`` takes that many layers per call in
        rotation, scaled by ``n_layers / layers_per_step``, to bound the cost of one step."""
        chosen, scale = self.next_rank_layers(layers_per_step)
        if not chosen:
            return torch.zeros((), requires_grad=False)
        return scale * torch.stack([nuclear_norm(update) for update in chosen]).sum()

    @torch.no_grad()
    def add_rank_loss_grad(self, weight: float, layers_per_step: int | None = None) -> torch.Tensor:
        """Add ``weight * d rank_loss / d values`` to the values' ``.grad`` without building a graph
        (what ``SaRAAdamW`` does each step). Returns the (scaled) rank loss value."""
        chosen, scale = self.next_rank_layers(layers_per_step)
        total = torch.zeros(())
        for update in chosen:
            norm, grad = nuclear_norm_and_grad(update)
            total += scale * norm.cpu()
            grad = (weight * scale) * grad.to(update.values.dtype)
            if update.values.grad is None:
                update.values.grad = grad
            else:
                update.values.grad += grad
        return total

    # ----------------------------------------------------------------- progressive step
    @torch.no_grad()
    def reselect(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Progressive step: keep training only the entries whose current |value| is still below
        the threshold; the others are frozen with their learned values. Returns the number of
        entries still trainable. Call it between ``optimizer.step()`` and the next backward.

        Each layer's values become a new, smaller Parameter (call ``parameters()`` again). Optimizer
        state (e.g. Adam moments) of the kept entries is kept: pass ``optimizer`` to move it now;
        without it, any torch optimizer holding the old values swaps them for the new ones, with
        sliced state, just before its next ``step()``. Under DDP, wrap the model again afterwards.
        Raises ``SaRAError`` for a "largest" or "random" selection (it has no threshold).
        """
        if self.threshold is None:
            raise SaRAError(
                f"the progressive step keeps the entries still below the selection threshold; "
                f"a {self.config.selection!r} selection has none"
            )
        for name, update in self.layers.items():
            old = update.values
            keep = update.reselect(self.weight(name), self.threshold)
            if optimizer is not None:
                swap_optimizer_param(optimizer, old, update.values, keep)
            else:
                self._pending_swaps[id(old)] = (old, update.values, keep)
        if self._pending_swaps and self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(self._swap_pending)
        return self.num_trainable

    def _swap_pending(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in list(group["params"]):
                pending = self._pending_swaps.pop(id(param), None)
                if pending is not None and pending[0] is param:
                    swap_optimizer_param(optimizer, *pending)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything SaRA holds beyond the pretrained model: per layer the ``SparseUpdate``'s
        state (selection, values, frozen entries, base fingerprint) and the rank-loss rotation."""
        return {
            "layers": {name: update.state_dict() for name, update in self.layers.items()},
            "rank_cursor": self._rank_cursor,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output into this handle, injected into the same base model with
        the same targets: the weights end up as they were when the state was taken.

        Raises ``SaRAError`` (before changing anything) if the layers differ or a layer's base
        fingerprint differs (the state was saved for other base weights). The layers' values
        become new Parameters: hand them to the optimizer again (``SaRAAdamW.load_state_dict``
        does)."""
        layers = state["layers"]
        if set(layers) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(layers)), sorted(set(layers) - set(self.layers))
            raise SaRAError(
                f"the saved SaRA state does not match this model's layers: missing {missing[:3]}, "
                f"unexpected {extra[:3]}; it was saved for another model or other targets"
            )
        for name, update in self.layers.items():
            if not torch.equal(layers[name]["probe_values"].cpu(), update.probe_values.cpu()):
                raise SaRAError(
                    f"the saved SaRA state of layer {name!r} was trained on other base weights "
                    f"(its fingerprint differs)"
                )
        for name, update in self.layers.items():
            weight = self.weight(name)
            update.restore_base_into(weight)
            update.load_state_dict(layers[name])
            if update.overlay_dtype is None:
                update.write_all_into(weight)
        self._rank_cursor = int(state["rank_cursor"])

    # ----------------------------------------------------------------- results
    @torch.no_grad()
    def delta(
        self,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, str] | None = None,
        values: Mapping[str, torch.Tensor] | None = None,
    ) -> SparseDelta:
        """The learned update ΔP of every layer (trainable and frozen entries) as a ``SparseDelta``.
        ``values`` (optional) replaces each layer's ΔP by a tensor of the same entries in the same
        (sorted-index) order, e.g. a ``SparseEMA``'s averages."""
        layers = {}
        for name, update in self.layers.items():
            indices, deltas = update.sparse_delta()
            if values is not None:
                if values[name].shape != deltas.shape:
                    raise SaRAError(f"layer {name!r}: {values[name].numel()} values for {deltas.numel()} entries")
                deltas = values[name]
            layers[name] = LayerDelta(
                update.shape,
                indices.cpu(),
                deltas.to(dtype).cpu(),
                update.probe_indices.cpu(),
                update.probe_values.cpu(),
            )
        selection = {"threshold": self.threshold, "budget": self.config.budget}
        if self.config.selection != "smallest":
            selection["selection"] = self.config.selection
        return SparseDelta(layers, selection, metadata)

    @torch.no_grad()
    def remove(self, merge: bool = True) -> None:
        """Restore plain modules (same parameter objects, original ``requires_grad`` flags) with the
        learned update merged into the weights (rounded once to their dtype), or with ``merge=False``
        the pretrained weights bit-exactly (take ``delta()`` first to keep what was learned). The
        handle is unusable afterwards."""
        if self.removed:
            return
        for name, update in self.layers.items():
            target = self._targets[name]
            if merge:
                update.write_all_into(self.weight(name))
            else:
                update.restore_base_into(self.weight(name))
            parametrize.remove_parametrizations(target.module, target.param_name, leave_parametrized=False)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        if self._step_hook is not None:
            self._step_hook.remove()
        for hook in self._layer_hooks:
            hook.remove()
        self.layers = {}
        self.removed = True


def swap_optimizer_param(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, keep: torch.Tensor
) -> None:
    """Replace ``old`` by ``new`` (= ``old[keep]``) in ``optimizer``'s groups and move its state,
    slicing per-entry state tensors (shape ``old.shape``) with ``keep``; scalar state such as
    Adam's ``step`` is kept as is. A no-op if ``optimizer`` does not hold ``old``."""
    for group in optimizer.param_groups:
        group["params"] = [new if param is old else param for param in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: value[keep.to(value.device)] if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()
        }
