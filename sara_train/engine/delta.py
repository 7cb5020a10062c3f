"""SparseDelta: a SaRA update as index/value pairs, saved as safetensors.

File format ``sara-delta`` version 1 (see README): for every weight key ``K``
  ``K::idx``        int32 [k]  strictly increasing row-major flat indices into the weight
  ``K::val``        F16/BF16/F32 [k]  the update ΔP = trained - base at those indices
  ``K::probe_idx``  int32 [p]  positions of the base weight's largest |w| (never trained)
  ``K::probe_val``  F32 [p]    the base weight's values there (the base fingerprint)
and ``__metadata__``: ``format`` = "sara-delta", ``format_version`` = "1", ``shapes`` (JSON
{K: shape}), ``selection`` (JSON {"threshold": θ, "budget": ...}), ``base_fingerprint`` (16 hex
digits), ``user`` (JSON object of strings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import DeltaFormatError, DeltaMismatchError, SaRAError
from .files import atomic_output, read_safetensors_header

if TYPE_CHECKING:
    from .apply import RestorePoint

FORMAT_NAME = "sara-delta"
FORMAT_VERSION = "1"
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""The float dtypes by the names every option uses (delta values, training compute dtype)."""
VALUE_DTYPES = tuple(DTYPES.values())
"""Dtypes a delta's values may have."""
PROBE_RTOL = 2e-2
"""Relative tolerance of the base check: passes across fp32/fp16/bf16 copies of one model."""
SUFFIXES = ("::idx", "::val", "::probe_idx", "::probe_val")


def check_strength(strength: float, where: str = "strength") -> float:
    """``strength`` as a float; ``SaRAError`` unless it is a finite number."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SaRAError(f"{where} must be a finite number, got {strength!r}")
    return float(strength)


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape codes, newlines) shown as escapes."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


@dataclass
class LayerDelta:
    """The update of one weight tensor of shape ``shape``.

    ``flat_indices``: int32 [k], strictly increasing, in ``[0, prod(shape))``.
    ``values``: [k] fp16/bf16/fp32, the additive update at those positions.
    ``probe_indices`` int32 [p] / ``probe_values`` fp32 [p]: base values at untouched positions.
    """

    shape: tuple[int, ...]
    flat_indices: torch.Tensor
    values: torch.Tensor
    probe_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    probe_values: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float32))

    @property
    def numel(self) -> int:
        return int(self.flat_indices.numel())

    @property
    def nbytes(self) -> int:
        return self.numel * (4 + self.values.element_size())

    def validate(self, where: str) -> None:
        """Raise ``DeltaFormatError`` (mentioning ``where``) unless the invariants above hold."""
        size = math.prod(self.shape)
        for name, tensor, dtypes in (
            ("indices", self.flat_indices, (torch.int32,)),
            ("values", self.values, VALUE_DTYPES),
            ("probe indices", self.probe_indices, (torch.int32,)),
            ("probe values", self.probe_values, (torch.float32,)),
        ):
            if tensor.dim() != 1:
                raise DeltaFormatError(f"{where}: {name} must be 1-D, got shape {tuple(tensor.shape)}")
            if tensor.dtype not in dtypes:
                raise DeltaFormatError(f"{where}: {name} have dtype {tensor.dtype}, expected one of {dtypes}")
        if self.values.numel() != self.flat_indices.numel():
            raise DeltaFormatError(f"{where}: {self.flat_indices.numel()} indices but {self.values.numel()} values")
        if self.probe_values.numel() != self.probe_indices.numel():
            raise DeltaFormatError(f"{where}: probe indices and probe values differ in length")
        for name, indices in (("indices", self.flat_indices), ("probe indices", self.probe_indices)):
            if indices.numel() == 0:
                continue
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= size:
                raise DeltaFormatError(
                    f"{where}: {name} out of range: [{low}, {high}] for a weight of "
                    f"shape {self.shape} ({size} entries)"
                )
            steps = indices[1:] - indices[:-1]
            if bool((steps == 0).any()):
                raise DeltaFormatError(f"{where}: duplicated {name}")
            if bool((steps < 0).any()):
                raise DeltaFormatError(f"{where}: {name} are not sorted in increasing order")
        if not bool(torch.isfinite(self.values).all()):
            bad = int((~torch.isfinite(self.values)).sum())
            raise DeltaFormatError(f"{where}: {bad} values are NaN or Inf")


@dataclass
class DeltaSummary:
    """What a delta holds: totals and one row per layer ``(key, shape, entries, fraction, bytes)``."""

    entries: int
    nbytes: int
    layers: list[tuple[str, tuple[int, ...], int, float, int]]
    base_fingerprint: str
    selection: dict
    metadata: dict[str, str]

    def __str__(self) -> str:
        lines = [
            f"SaRA delta: {len(self.layers)} layers, {self.entries:,} entries, "
            f"{self.nbytes / 2**20:.2f} MiB, base {self.base_fingerprint}, selection {printable(str(self.selection))}"
        ]
        if self.metadata:
            lines.append(
                "metadata: " + ", ".join(f"{printable(k)}={printable(v)}" for k, v in sorted(self.metadata.items()))
            )
        width = max((len(row[0]) for row in self.layers), default=5)
        lines.append(f"{'layer':<{width}}  {'shape':<20} {'entries':>11} {'of layer':>9} {'bytes':>11}")
        for key, shape, entries, fraction, nbytes in self.layers:
            lines.append(
                f"{printable(key):<{width}}  {str(list(shape)):<20} {entries:>11,} {fraction:>8.2%} {nbytes:>11,}"
            )
        return "\n".join(lines)


class SparseDelta:
    """A set of ``LayerDelta`` keyed by weight name, plus selection info and user metadata."""

    def __init__(
        self,
        layers: Mapping[str, LayerDelta],
        selection: Mapping | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.layers: dict[str, LayerDelta] = dict(sorted(layers.items()))
        self.selection: dict = dict(selection or {})
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        for key, layer in self.layers.items():
            layer.validate(f"delta layer {key!r}")

    # ----------------------------------------------------------------- introspection
    @property
    def num_entries(self) -> int:
        return sum(layer.numel for layer in self.layers.values())

    @property
    def base_fingerprint(self) -> str:
        """16 hex digits identifying the base weights (keys, shapes, probe values rounded to bf16)."""
        digest = hashlib.sha256()
        for key, layer in self.layers.items():
            digest.update(f"{key}:{list(layer.shape)}:".encode())
            digest.update(layer.probe_indices.numpy().tobytes())
            digest.update(layer.probe_values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        return digest.hexdigest()[:16]

    def content_hash(self) -> str:
        """16 hex digits identifying what the delta adds: keys, shapes, indices and values (as fp32).
        Equal for the same delta whatever its value dtype was widened to; used to notice a delta
        being merged into a checkpoint a second time."""
        digest = hashlib.sha256()
        for key, layer in self.layers.items():
            digest.update(f"{key}:{list(layer.shape)}:".encode())
            digest.update(layer.flat_indices.numpy().tobytes())
            digest.update(layer.values.float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def summary(self) -> DeltaSummary:
        rows = [
            (key, layer.shape, layer.numel, layer.numel / max(1, math.prod(layer.shape)), layer.nbytes)
            for key, layer in self.layers.items()
        ]
        return DeltaSummary(
            self.num_entries, sum(r[4] for r in rows), rows, self.base_fingerprint, self.selection, self.metadata
        )

    def __repr__(self) -> str:
        return f"SparseDelta({len(self.layers)} layers, {self.num_entries:,} entries, base {self.base_fingerprint})"

    # ----------------------------------------------------------------- arithmetic
    def to(self, dtype: torch.dtype) -> SparseDelta:
        """A copy whose values are stored as ``dtype`` (fp16, bf16 or fp32)."""
        if dtype not in VALUE_DTYPES:
            raise SaRAError(f"delta values must be one of {VALUE_DTYPES}, got {dtype}")
        if dtype != torch.float32:
            limit = torch.finfo(dtype).max
            for key, layer in self.layers.items():
                if layer.numel and float(layer.values.float().abs().max()) > limit:
                    raise SaRAError(f"delta layer {key!r} has values beyond the {dtype} range; keep float32")
        return SparseDelta(
            {k: replace(v, values=v.values.to(dtype)) for k, v in self.layers.items()}, self.selection, self.metadata
        )

    def scale(self, strength: float) -> SparseDelta:
        """A copy with every value multiplied by ``strength`` (computed in fp32)."""
        strength = check_strength(strength)
        layers = {
            k: replace(v, values=(v.values.float() * strength).to(v.values.dtype)) for k, v in self.layers.items()
        }
        return SparseDelta(layers, self.selection, self.metadata)

    @classmethod
    def stack(
        cls, deltas: Sequence[SparseDelta], strengths: Sequence[float] | None = None, check_base: bool = True
    ) -> SparseDelta:
        """One delta equal to ``sum(strength_i * delta_i)``: index sets are united, values summed.

        Values are summed in fp32 and stored in the inputs' dtype when they all share one, else in
        fp32 (so neither fp16's range nor bf16's precision is lost). With ``check_base``, deltas
        that disagree on the base weights of a shared key raise ``DeltaMismatchError``. Strengths
        must be finite (``SaRAError``).
        """
        if not deltas:
            raise SaRAError("stack needs at least one delta")
        strengths = [1.0] * len(deltas) if strengths is None else list(strengths)
        if len(strengths) != len(deltas):
            raise SaRAError(f"stack got {len(deltas)} deltas but {len(strengths)} strengths")
        strengths = [check_strength(s) for s in strengths]
        if len(deltas) == 1:  # nothing to unite: no copies of the indices
            return deltas[0] if strengths[0] == 1.0 else deltas[0].scale(strengths[0])
        dtypes = {layer.values.dtype for delta in deltas for layer in delta.layers.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        parts: dict[str, list[tuple[LayerDelta, float]]] = {}
        for delta, strength in zip(deltas, strengths):
            for key, layer in delta.layers.items():
                parts.setdefault(key, []).append((layer, strength))
        layers = {}
        for key, items in parts.items():
            first = items[0][0]
            for layer, _ in items[1:]:
                if layer.shape != first.shape:
                    raise DeltaMismatchError(
                        f"cannot stack deltas: {key!r} has shapes {first.shape} and {layer.shape}"
                    )
                if check_base and not _probes_agree(first, layer):
                    raise DeltaMismatchError(
                        f"cannot stack deltas trained from different base weights "
                        f"(they differ at {key!r}); pass check_base=False to force"
                    )
            indices = torch.cat([layer.flat_indices for layer, _ in items]).long()
            values = torch.cat([layer.values.float() * s for layer, s in items])
            unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
            summed = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values)
            layers[key] = replace(first, flat_indices=unique.to(torch.int32), values=summed.to(dtype))
        metadata: dict[str, str] = {}
        for delta in deltas:
            metadata.update(delta.metadata)
        return cls(layers, deltas[0].selection, metadata)

    def __add__(self, other: SparseDelta) -> SparseDelta:
        return SparseDelta.stack([self, other])

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the delta atomically to ``path`` (safetensors); ``dtype`` converts the values."""
        delta = self if dtype is None else self.to(dtype)
        tensors: dict[str, torch.Tensor] = {}
        for key, layer in delta.layers.items():
            for suffix, tensor in zip(
                SUFFIXES, (layer.flat_indices, layer.values, layer.probe_indices, layer.probe_values)
            ):
                tensors[key + suffix] = tensor.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shapes": json.dumps({k: list(v.shape) for k, v in delta.layers.items()}),
            "selection": json.dumps(delta.selection),
            "base_fingerprint": delta.base_fingerprint,
            "user": json.dumps(delta.metadata),
        }
        path = Path(path)
        with atomic_output(path) as temp:
            save_file(tensors, str(temp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """Read and validate a delta file. Never unpickles; raises ``DeltaFormatError`` naming the
        file and the problem (not safetensors, truncated, wrong format, bad indices or values)."""
        header = read_safetensors_header(path, DeltaFormatError)
        meta = header.metadata
        if meta.get("format") != FORMAT_NAME:
            raise DeltaFormatError(
                f"{path} is a safetensors file but not a SaRA delta "
                f"(metadata format={meta.get('format')!r}, expected {FORMAT_NAME!r})"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise DeltaFormatError(
                f"{path}: unsupported sara-delta version {meta.get('format_version')!r} "
                f"(this sara_train reads version {FORMAT_VERSION})"
            )
        shapes, selection, user = _parse_metadata(path, meta)
        expected = {key + suffix for key in shapes for suffix in SUFFIXES}
        if set(header.tensors) != expected:
            missing = sorted(expected - set(header.tensors))[:3]
            extra = sorted(set(header.tensors) - expected)[:3]
            raise DeltaFormatError(
                f"{path}: tensors do not match the declared layers (missing {missing}, unexpected {extra})"
            )
        layers = {}
        try:
            with safe_open(str(path), framework="pt") as file:
                for key, shape in shapes.items():
                    idx, val, probe_idx, probe_val = (file.get_tensor(key + s) for s in SUFFIXES)
                    layers[key] = LayerDelta(shape, idx, val, probe_idx, probe_val)
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise DeltaFormatError(f"{path}: cannot read tensors ({exc})") from None
        for key, layer in layers.items():
            layer.validate(f"{path}: layer {key!r}")
        return cls(layers, selection, user)

    # ----------------------------------------------------------------- applying
    def fit(self, target: nn.Module | Mapping[str, torch.Tensor]) -> SparseDelta:
        """This delta re-keyed (and, for fused tensors, re-indexed) to the names of a module or a
        state dict; see ``sara_train.engine.apply.fit_delta`` (which also takes bare shapes)."""
        from .apply import fit_delta, named_tensors

        return fit_delta(self, {name: tuple(t.shape) for name, t in named_tensors(target).items()})

    def apply_to(
        self, target: nn.Module | Mapping[str, torch.Tensor], strength: float = 1.0, check_base: bool = True
    ) -> RestorePoint:
        """Add ``strength * delta`` in place to a module's parameters or a state dict, whatever key
        naming either uses (see ``sara_train.engine.apply.apply_delta``). Returns the ``RestorePoint``
        that undoes it bit-exactly."""
        from .apply import apply_delta

        return apply_delta(self, target, strength, check_base)


def _parse_metadata(path: str | os.PathLike, meta: dict[str, str]) -> tuple[dict[str, tuple[int, ...]], dict, dict]:
    """``(shapes, selection, user)`` from a delta file's metadata; ``DeltaFormatError`` unless
    ``shapes`` is an object of non-negative integer lists, ``selection`` an object and ``user`` an
    object of strings."""

    def parse(name: str, default: str):
        try:
            return json.loads(meta.get(name, default))
        except (ValueError, RecursionError) as exc:
            raise DeltaFormatError(f"{path}: metadata {name!r} is not valid JSON ({exc})") from None

    shapes, selection, user = parse("shapes", "null"), parse("selection", "{}"), parse("user", "{}")
    if not isinstance(shapes, dict) or not all(
        isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
        for dims in shapes.values()
    ):
        raise DeltaFormatError(
            f"{path}: metadata 'shapes' must be a JSON object of layer shapes (lists of non-negative integers)"
        )
    if not isinstance(selection, dict):
        raise DeltaFormatError(f"{path}: metadata 'selection' must be a JSON object, got {type(selection).__name__}")
    if not isinstance(user, dict) or not all(isinstance(value, str) for value in user.values()):
        raise DeltaFormatError(f"{path}: metadata 'user' must be a JSON object of strings")
    return {key: tuple(dims) for key, dims in shapes.items()}, selection, user


def _probes_agree(layer: LayerDelta, other: LayerDelta) -> bool:
    return torch.equal(layer.probe_indices, other.probe_indices) and torch.allclose(
        layer.probe_values, other.probe_values, rtol=PROBE_RTOL, atol=0
    )
