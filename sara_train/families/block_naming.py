"""Transformer families whose two namings differ block by block: a table of rules, expanded for the
blocks a model has, places a delta of either naming on a target of the other (a ``KeyNaming``).

The "original" naming is the checkpoint naming the model's authors released, which ComfyUI uses
(``diffusion_model.`` in a ComfyUI model, ``model.diffusion_model.`` in a single-file checkpoint);
the "diffusers" naming is the diffusers model class's (``transformer.`` in pipeline files). A rule
maps one original tensor to diffusers tensors by rows (the first dimension):

* a rename keeps every row (``parts=(("to_out.0.weight", ALL),)``);
* a split stacks several diffusers tensors in the original one, in order (fused q, k, v:
  ``THIRD`` each; Flux's single-block ``linear1``: ``WIDTH`` three times, then the ``REST``);
* a swap exchanges the two halves of the rows (``swap=True``: the shift/scale order of a final
  adaptive norm).

Rules are written once per tensor suffix, ``{wb}`` standing for both ``weight`` and ``bias``; a
``scope`` says which blocks they repeat in. Expanding needs every tensor of the target (its block
count and width), which the delta path always has; the delta may hold any subset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..engine.apply import Piece, Placement, Shapes
from ..engine.errors import DeltaMismatchError

ALL, THIRD, WIDTH, REST = "all", "third", "width", "rest"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
DIFFUSERS_PREFIXES = ("transformer.", "")


@dataclass(frozen=True)
class Scope:
    """Where rules repeat: ``original`` / ``diffusers`` key prefixes with ``{i}`` for the block index,
    and which of the blocks found (``"all"``, only the ``"last"``, or all but the last)."""

    original: str = ""
    diffusers: str = ""
    blocks: str = "all"


@dataclass(frozen=True)
class Rule:
    scope: str
    original: str
    parts: tuple[tuple[str, str], ...]
    swap: bool = False

    def expanded(self) -> Iterator[Rule]:
        """This rule with ``{wb}`` expanded to its ``weight`` and ``bias`` rules."""
        if "{wb}" not in self.original:
            yield self
            return
        for end in ("weight", "bias"):
            yield Rule(
                self.scope,
                self.original.replace("{wb}", end),
                tuple((suffix.replace("{wb}", end), rows) for suffix, rows in self.parts),
                self.swap,
            )


class BlockNaming:
    """A ``KeyNaming`` from a rule table. ``signatures[side]`` are keys every model of this family
    has in that naming (how a target is recognised); ``width(original_shapes)`` reads the model
    width (needed by ``WIDTH`` parts) off a full original-naming shape dict."""

    def __init__(
        self,
        description: str,
        scopes: Mapping[str, Scope],
        rules: tuple[Rule, ...],
        signatures: Mapping[str, tuple[str, ...]],
        width: Callable[[Mapping[str, tuple[int, ...]]], int],
    ) -> None:
        self.description = description
        self.scopes = dict(scopes)
        self.signatures = dict(signatures)
        self.rules = tuple(expanded for rule in rules for expanded in rule.expanded())
        self.width = width
        self._patterns = {
            side: [self._pattern(rule, side) for rule in self.rules] for side in ("original", "diffusers")
        }

    def _pattern(self, rule: Rule, side: str) -> re.Pattern:
        """Matches the bare keys of ``rule``'s tensors in ``side``'s naming, in any block."""
        prefix = re.escape(getattr(self.scopes[rule.scope], side)).replace(re.escape("{i}"), "\\d+")
        suffixes = [rule.original] if side == "original" else [suffix for suffix, _ in rule.parts]
        return re.compile(prefix + "(" + "|".join(re.escape(suffix) for suffix in suffixes) + ")$")

    def delta_naming(self, keys: Mapping[str, object]) -> tuple[str, str] | None:
        """``(side, prefix)`` when every delta key, after one common prefix, is a tensor of that side's
        naming and not every one is also a tensor of the other's; else None."""
        for side, other, prefixes in (
            ("original", "diffusers", ORIGINAL_PREFIXES),
            ("diffusers", "original", DIFFUSERS_PREFIXES),
        ):
            for prefix in prefixes:
                bare = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
                if not keys or len(bare) != len(keys):
                    continue
                if all(self._known(key, side) for key in bare) and not all(self._known(key, other) for key in bare):
                    return side, prefix
        return None

    def target_model(self, keys: Mapping[str, object]) -> tuple[str, str, dict[str, tuple[int, ...]]] | None:
        """``(side, prefix, bare shapes of the model)`` when the target holds this family's model in one
        naming (all its signature keys under one prefix; other tensors, such as a checkpoint's VAE,
        are ignored); else None."""
        for side, prefixes in (("original", ORIGINAL_PREFIXES), ("diffusers", DIFFUSERS_PREFIXES)):
            for prefix in prefixes:
                if all(prefix + signature in keys for signature in self.signatures[side]):
                    bare = {key[len(prefix) :]: tuple(shape) for key, shape in keys.items() if key.startswith(prefix)}
                    return side, prefix, {key: shape for key, shape in bare.items() if self._known(key, side)}
        return None

    def _known(self, key: str, side: str) -> bool:
        return any(pattern.match(key) for pattern in self._patterns[side])

    def place(self, delta: Shapes, target: Shapes) -> dict[str, Placement] | None:
        """Placements of the delta's keys in the target when one is in the original naming and the
        other in the diffusers naming of this family; None otherwise."""
        delta_naming, target_model = self.delta_naming(delta), self.target_model(target)
        if delta_naming is None or target_model is None or delta_naming[0] == target_model[0]:
            return None
        (delta_side, delta_prefix), (target_side, target_prefix, model) = delta_naming, target_model
        original = model if target_side == "original" else self.original_shapes(model)
        table = self.table(original)  # original key -> pieces in diffusers keys
        if delta_side == "diffusers":
            table = invert(table)
        placed = {}
        for key in delta:
            pieces = table.get(key[len(delta_prefix) :])
            if pieces is None:
                raise DeltaMismatchError(
                    f"delta key {key!r} has no counterpart in the target's "
                    f"{self.description}: the delta is for another model"
                )
            placed[key] = tuple(
                Piece(target_prefix + piece.key, piece.start, piece.stop, piece.target_row) for piece in pieces
            )
        return placed

    def table(self, original: Mapping[str, tuple[int, ...]]) -> dict[str, Placement]:
        """Every original tensor of a model (bare keys, all of them) -> its pieces in diffusers keys."""
        width = self.width(original)
        table = {}
        for rule, block in self._instances(original, "original"):
            key = self._key(rule.scope, "original", block) + rule.original
            if key not in original:
                continue
            rows = original[key][0] if original[key] else 1
            prefix = self._key(rule.scope, "diffusers", block)
            if rule.swap:
                half = rows // 2
                ((suffix, _),) = rule.parts
                table[key] = (Piece(prefix + suffix, 0, half, half), Piece(prefix + suffix, half, rows, 0))
                continue
            sizes = [
                rows if size == ALL else rows // 3 if size == THIRD else width if size == WIDTH else None
                for _, size in rule.parts
            ]
            if None in sizes:
                sizes[sizes.index(None)] = rows - sum(size for size in sizes if size is not None)
            start, pieces = 0, []
            for (suffix, _), size in zip(rule.parts, sizes, strict=True):
                pieces.append(Piece(prefix + suffix, start, start + size))
                start += size
            table[key] = tuple(pieces)
        return table

    def to_diffusers(self, original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model's tensors in the original naming (bare keys, all of them) as the diffusers model's:
        fused tensors split, swapped halves put back. Tensors the rules do not know are left out."""
        chunks: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for key, pieces in self.table({key: tuple(tensor.shape) for key, tensor in original.items()}).items():
            for piece in pieces:
                chunks.setdefault(piece.key, []).append((piece.target_row, original[key][piece.start : piece.stop]))
        return {
            key: torch.cat([rows for _, rows in sorted(parts, key=lambda part: part[0])])
            for key, parts in chunks.items()
        }

    def original_shapes(self, diffusers: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The original-naming shapes of a model given in diffusers naming (bare keys, all of them)."""
        original = {}
        for rule, block in self._instances(diffusers, "diffusers"):
            prefix = self._key(rule.scope, "diffusers", block)
            parts = [diffusers.get(prefix + suffix) for suffix, _ in rule.parts]
            if all(shape is not None for shape in parts):
                rows = sum(shape[0] if shape else 1 for shape in parts)
                original[self._key(rule.scope, "original", block) + rule.original] = (rows, *parts[0][1:])
        return original

    def _instances(self, keys: Mapping[str, object], side: str) -> Iterator[tuple[Rule, int | None]]:
        """Each rule with each block index it applies to among ``keys`` (``None`` outside blocks)."""
        found = {}
        for name, scope in self.scopes.items():
            prefix = getattr(scope, side)
            if "{i}" in prefix:
                pattern = re.compile(re.escape(prefix).replace(re.escape("{i}"), "(\\d+)"))
                found[name] = sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})
        for rule in self.rules:
            scope = self.scopes[rule.scope]
            if rule.scope not in found:
                yield rule, None
                continue
            blocks = found[rule.scope]
            last = blocks[-1] if blocks else None
            for block in blocks:
                if scope.blocks == "all" or (scope.blocks == "last") == (block == last):
                    yield rule, block

    def _key(self, scope: str, side: str, block: int | None) -> str:
        prefix = getattr(self.scopes[scope], side)
        return prefix if block is None else prefix.replace("{i}", str(block))


def invert(table: Mapping[str, Placement]) -> dict[str, Placement]:
    """A placement table read the other way: each target tensor's rows back to the source tensors."""
    inverted: dict[str, list[Piece]] = {}
    for source, pieces in table.items():
        for piece in pieces:
            length = piece.stop - piece.start
            inverted.setdefault(piece.key, []).append(
                Piece(source, piece.target_row, piece.target_row + length, piece.start)
            )
    return {key: tuple(sorted(pieces, key=lambda piece: piece.start)) for key, pieces in inverted.items()}
