"""The one delta path: fit a delta to a target, check it, and add it at a strength.

A delta carries the key names of the model it was trained on (a diffusers UNet, ComfyUI's
``diffusion_model.*``, a checkpoint's ``model.diffusion_model.*``, ...). ``fit_delta`` maps it onto
any target holding the same weights, known only by its keys and shapes (a module, a state dict, a
checkpoint header, a ComfyUI model), and returns the delta re-keyed to the target's names:

1. exactly;
2. through a registered ``KeyNaming``: the model families (``sara_train.families``) register what
   they know about two names for the same weights (Stable Diffusion UNets in diffusers and original
   naming, ...). A naming may also move rows: a tensor fused in one naming (q, k and v stacked
   along the first dimension) is split in the other, so the flat indices of a delta layer are
   remapped, not just renamed;
3. through one common prefix (``resolve_keys``: ``diffusion_model.*`` <-> ``model.diffusion_model.*``).

Each delta layer is placed as one or more ``Piece``s: its rows [start, stop) land in target tensor
``key`` from row ``target_row`` on. Rows run along the first dimension; the rest of the shape (one
row's entries) must agree. Then ``check_layer_fits`` checks the fitted layer against the target
tensor (shape, dtype, and the base fingerprint), and ``add_sparse_`` adds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .delta import PROBE_RTOL, LayerDelta, SparseDelta, check_strength
from .errors import DeltaMismatchError, SaRAError
from .keys import resolve_keys

Shapes = Mapping[str, Sequence[int]]
"""Tensor names and shapes of a target (or of a delta's layers)."""


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a delta layer land in target tensor ``key`` from row ``target_row``."""

    key: str
    start: int
    stop: int
    target_row: int = 0


Placement = tuple[Piece, ...]


class KeyNaming(Protocol):
    """What a model family knows about two namings of the same weights (see ``register_naming``)."""

    description: str

    def place(self, delta: Shapes, target: Shapes) -> dict[str, Placement] | None:
        """A placement for every key of ``delta`` among the keys of ``target``; None when this naming
        does not relate the two (neither is one of its namings, or they already agree). Raises
        ``DeltaMismatchError`` when it recognises both sides but the delta does not fit."""


KEY_NAMINGS: list[KeyNaming] = []
"""The namings ``fit_delta`` tries after exact and prefix matching. ``sara_train.families``
registers the model families' namings when ``sara_train`` is imported."""


def register_naming(naming: KeyNaming) -> None:
    """Add ``naming`` to ``KEY_NAMINGS`` (once)."""
    if naming not in KEY_NAMINGS:
        KEY_NAMINGS.append(naming)


def rows_of(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, entries per row)`` of a tensor shape: rows along the first dimension (a 0-d tensor
    is one row of one entry)."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def whole(key: str, shape: Sequence[int]) -> Placement:
    """The placement of a layer that lands unchanged on target tensor ``key``."""
    return (Piece(key, 0, rows_of(shape)[0]),)


def place_keys(delta: Shapes, target: Shapes, target_name: str) -> dict[str, Placement]:
    """Where each delta layer lands in the target: under its own name if the target has them all;
    else through the one registered naming that relates the two (a naming knows more than a prefix
    does: a diffusers UNet's ``conv_in.weight`` also fits a checkpoint's VAE by prefix); else
    through one common prefix. Raises ``DeltaMismatchError`` when nothing fits or namings disagree."""
    if all(key in target for key in delta):
        return {key: whole(key, shape) for key, shape in delta.items()}
    found = [(naming, placed) for naming in KEY_NAMINGS if (placed := naming.place(delta, target)) is not None]
    if any(placed != found[0][1] for _, placed in found[1:]):
        names = ", ".join(naming.description for naming, _ in found)
        raise DeltaMismatchError(
            f"the delta fits {target_name} in different ways through {names}; rename its keys to the target's names"
        )
    if found:
        return found[0][1]
    return {key: whole(target_key, delta[key]) for key, target_key in resolve_keys(delta, target, target_name).items()}


def fit_delta(delta: SparseDelta, target: Shapes, target_name: str = "the target") -> SparseDelta:
    """``delta`` re-keyed to ``target``'s tensor names and shapes, its indices (and probes) remapped
    through the placement (``place_keys``). Layers that land unchanged are shared, not copied.

    Raises ``DeltaMismatchError`` when a key has no place, a layer's rows do not fit the target
    tensor (the delta is for another architecture), or two delta layers write the same entries.
    """
    placements = place_keys({key: layer.shape for key, layer in delta.layers.items()}, target, target_name)
    parts: dict[str, list[LayerDelta]] = {}
    for key, layer in delta.layers.items():
        for piece in placements[key]:
            target_shape = tuple(target[piece.key])
            parts.setdefault(piece.key, []).append(_moved(key, layer, piece, target_shape, target_name))
    layers = {}
    for target_key, pieces in parts.items():
        layers[target_key] = pieces[0] if len(pieces) == 1 else _joined(target_key, pieces, target_name)
    return SparseDelta(layers, delta.selection, delta.metadata)


def _moved(key: str, layer: LayerDelta, piece: Piece, target_shape: tuple[int, ...], target_name: str) -> LayerDelta:
    """The part of ``layer`` that ``piece`` places, in the coordinates of a target of ``target_shape``
    (which must have the layer's shape apart from the first dimension)."""
    rows, row_size = rows_of(layer.shape)
    if (
        tuple(layer.shape[1:]) != tuple(target_shape[1:])
        or not 0 <= piece.start <= piece.stop <= rows
        or piece.target_row + piece.stop - piece.start > rows_of(target_shape)[0]
    ):
        raise DeltaMismatchError(
            f"delta layer {key!r} has shape {layer.shape} but {target_name}'s "
            f"{piece.key!r} has shape {target_shape}: the delta is for another model"
        )
    if tuple(layer.shape) == tuple(target_shape) and (piece.start, piece.stop, piece.target_row) == (0, rows, 0):
        return layer
    low, high, shift = piece.start * row_size, piece.stop * row_size, (piece.target_row - piece.start) * row_size
    inside = (layer.flat_indices >= low) & (layer.flat_indices < high)
    probes_inside = (layer.probe_indices >= low) & (layer.probe_indices < high)
    return LayerDelta(
        target_shape,
        (layer.flat_indices[inside].long() + shift).to(torch.int32),
        layer.values[inside],
        (layer.probe_indices[probes_inside].long() + shift).to(torch.int32),
        layer.probe_values[probes_inside],
    )


def _joined(target_key: str, pieces: list[LayerDelta], target_name: str) -> LayerDelta:
    """Several placed parts of one target tensor as one layer (indices sorted; overlaps refused)."""
    indices = torch.cat([piece.flat_indices for piece in pieces])
    order = indices.argsort()
    indices = indices[order]
    if bool((indices[1:] == indices[:-1]).any()):
        raise DeltaMismatchError(f"two layers of the delta write the same entries of {target_name}'s {target_key!r}")
    dtype = pieces[0].values.dtype if len({p.values.dtype for p in pieces}) == 1 else torch.float32
    values = torch.cat([piece.values.to(dtype) for piece in pieces])[order]
    probe_indices = torch.cat([piece.probe_indices for piece in pieces])
    probe_order = probe_indices.argsort()
    probe_values = torch.cat([piece.probe_values for piece in pieces])[probe_order]
    return LayerDelta(pieces[0].shape, indices, values, probe_indices[probe_order], probe_values)


def check_layer_fits(key: str, layer: LayerDelta, weight: torch.Tensor, check_base: bool) -> None:
    """Raise ``DeltaMismatchError`` unless ``layer`` can be added to ``weight`` (shape, float dtype,
    contiguous storage, and with ``check_base`` the probe values, compared to ``PROBE_RTOL``)."""
    if tuple(weight.shape) != tuple(layer.shape):
        raise DeltaMismatchError(
            f"delta layer {key!r} has shape {layer.shape} but the target tensor has "
            f"shape {tuple(weight.shape)}: the delta is for another model"
        )
    if not weight.is_floating_point():
        raise DeltaMismatchError(f"target tensor for {key!r} has dtype {weight.dtype}, not a float")
    if not weight.is_contiguous():
        raise DeltaMismatchError(f"target tensor for {key!r} is not contiguous")
    if check_base and layer.probe_indices.numel():
        found = weight.detach().reshape(-1)[layer.probe_indices.to(weight.device)].float().cpu()
        if not torch.allclose(found, layer.probe_values, rtol=PROBE_RTOL, atol=0):
            raise DeltaMismatchError(
                f"base weights differ at {key!r}: this delta was trained from another model "
                f"(expected {layer.probe_values.tolist()}, found {found.tolist()} at probe positions); "
                f"pass check_base=False to apply it anyway"
            )


def add_sparse_(weight: torch.Tensor, layer: LayerDelta, strength: float) -> None:
    """``weight.flatten()[layer.flat_indices] += strength * layer.values`` in place, computed in fp32
    and rounded once to ``weight.dtype``. ``weight`` must be contiguous."""
    flat = weight.view(-1)
    indices = layer.flat_indices.to(weight.device)
    updated = flat[indices].float() + strength * layer.values.to(weight.device, torch.float32)
    flat[indices] = updated.to(weight.dtype)


class RestorePoint:
    """The old values of tensors at the positions a delta changed; ``restore()`` puts them back."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def remember(self, tensor: torch.Tensor, flat_indices: torch.Tensor) -> None:
        indices = flat_indices.to(tensor.device)
        self._saved.append((tensor, indices, tensor.view(-1)[indices].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the remembered values back, bit-exactly; a second call does nothing."""
        for tensor, indices, old in reversed(self._saved):
            tensor.view(-1)[indices] = old
        self._saved.clear()


def named_tensors(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name, or a state dict as it is. ``SaRAError`` for a
    module SaRA is injected into (apply to it after ``handle.remove()``) or another type."""
    if isinstance(target, nn.Module):
        tensors = dict(target.named_parameters(remove_duplicate=False))
        tensors.update(target.named_buffers(remove_duplicate=False))
        if any(".parametrizations." in name for name in tensors):
            raise SaRAError(
                "the target module is parametrized (SaRA is injected?); call handle.remove() before applying a delta"
            )
        return tensors
    if isinstance(target, Mapping):
        return dict(target)
    raise SaRAError(f"a delta applies to an nn.Module or a state dict, got {type(target).__name__}")


def fit_to_tensors(
    delta: SparseDelta, tensors: Mapping[str, torch.Tensor], check_base: bool, target_name: str = "the target"
) -> SparseDelta:
    """``fit_delta`` to ``tensors`` (a module's or a state dict's), then ``check_layer_fits`` every
    layer against its tensor: the delta ready to add, or ``DeltaMismatchError``."""
    fitted = fit_delta(delta, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, target_name)
    for key, layer in fitted.layers.items():
        check_layer_fits(key, layer, tensors[key], check_base)
    return fitted


def apply_delta(
    delta: SparseDelta, target: nn.Module | Mapping[str, torch.Tensor], strength: float = 1.0, check_base: bool = True
) -> RestorePoint:
    """Add ``strength * delta`` in place to a module's parameters (and buffers) or a state dict.

    The delta is fitted to the target (``fit_delta``: by name, prefix or a model family's naming)
    and every layer checked (shape, dtype, contiguity, and unless ``check_base=False`` the base
    fingerprint) before anything changes; if adding still fails, changed tensors are restored.
    Raises ``DeltaMismatchError``, or ``SaRAError`` for a strength that is not finite. The returned
    ``RestorePoint`` undoes it bit-exactly.
    """
    strength = check_strength(strength)
    tensors = named_tensors(target)
    fitted = fit_to_tensors(delta, tensors, check_base)
    restore_point = RestorePoint()
    with torch.no_grad():
        try:
            for key, layer in fitted.layers.items():
                restore_point.remember(tensors[key], layer.flat_indices)
                add_sparse_(tensors[key], layer, strength)
        except BaseException:
            restore_point.restore()
            raise
    return restore_point


def load_deltas(items: Iterable[SparseDelta | str]) -> list[SparseDelta]:
    """Deltas given as objects or file paths, loaded as needed."""
    return [item if isinstance(item, SparseDelta) else SparseDelta.load(item) for item in items]
