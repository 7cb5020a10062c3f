"""Approximate export: each layer's sparse update as a rank-R LoRA (kohya naming), by SVD.

A SaRA update is sparse, not low-rank: the nuclear-norm loss lowers its rank, but a rank-R
truncation still drops the update's energy beyond the R largest singular values. The export
measures that loss per layer as the relative Frobenius error ``||D - up @ down|| / ||D||`` of the
factors as stored (truncation and rounding to their dtype) and refuses to write a file whose overall error exceeds
``max_error``, so an approximate file is never silently bad.

Per layer ``lora_unet_<module>``: ``.lora_down.weight`` [R, in(, kh, kw)], ``.lora_up.weight``
[out, R(, 1, 1)] and ``.alpha`` = R (scale 1). Loaders add ``strength * up @ down``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine.delta import SparseDelta
from ..engine.errors import SaRAError
from ..engine.files import atomic_output
from .diff import dense_update, values_dtype
from .layers import Naming, Shapes, base_model_version_of, delta_in_naming, loader_layers, loader_metadata

DEFAULT_MAX_ERROR = 0.1
"""Largest overall relative Frobenius error written without the user raising the limit."""


@dataclass(frozen=True)
class LayerError:
    """One layer's truncation: its LoRA name, the rank kept, the relative Frobenius error."""

    name: str
    rank: int
    relative_error: float


@dataclass
class LoRAExport:
    """The factors of every layer (``tensors``, in file naming), the errors, the overall
    ``relative_error`` = sqrt(sum over layers of ||D - up @ down||^2 / sum of ||D||^2), and the
    ``path`` written (None until ``export_lora`` writes it)."""

    tensors: dict[str, torch.Tensor]
    layers: list[LayerError]
    relative_error: float
    path: Path | None = None

    def table(self, worst: int = 10) -> str:
        """The overall error and the ``worst`` layers' errors, one per line."""
        rows = sorted(self.layers, key=lambda layer: -layer.relative_error)[:worst]
        width = max((len(row.name) for row in rows), default=5)
        lines = [f"relative Frobenius error: {self.relative_error:.2%} overall; worst layers:"]
        lines += [f"  {row.name:<{width}}  rank {row.rank:>4}  {row.relative_error:7.2%}" for row in rows]
        return "\n".join(lines)


def truncate(dense: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(up, down, residual, total)`` for a weight update ``dense`` [out, in(, kh, kw)]: the best
    rank-``rank`` factors (Eckart-Young, by SVD in fp32) stored as ``dtype`` (up [out, r(, 1, 1)],
    down [r, in(, kh, kw)], r = min(rank, out, in*kh*kw)), the squared Frobenius norm of what a
    loader's ``up @ down`` misses (truncation and rounding to ``dtype``), and that of ``dense``."""
    matrix = dense.float().reshape(dense.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    up = (u[:, :kept] * root).to(dtype)
    down = (root[:, None] * vh[:kept]).to(dtype)
    residual = matrix.double() - up.double() @ down.double()
    shaped_up = up.reshape(dense.shape[0], kept, *([1] * (dense.dim() - 2)))
    shaped_down = down.reshape(kept, *dense.shape[1:])
    return shaped_up, shaped_down, float(residual.pow(2).sum()), float(matrix.double().pow(2).sum())


def lora_factors(
    delta: SparseDelta,
    rank: int,
    naming: Naming = "ldm",
    dtype: torch.dtype | None = None,
    base: Shapes | None = None,
) -> LoRAExport:
    """Every weight layer of ``delta`` as rank-``rank`` LoRA factors and its error (nothing written).
    ``SaRAError`` for a rank below 1 or layers that are not matrices or convolution kernels."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SaRAError(f"rank must be a positive integer, got {rank!r}")
    dtype = dtype or values_dtype(delta)
    layers = loader_layers(delta_in_naming(delta, naming, base))
    not_matrices = [
        name for name, (parameter, layer) in layers.items() if parameter != "weight" or len(layer.shape) < 2
    ]
    if not_matrices:
        raise SaRAError(
            f"a LoRA holds matrices; the delta also updates {len(not_matrices)} biases or 1-D weights "
            f"(e.g. {not_matrices[:3]}): export them exactly with --to webui-diff"
        )
    tensors: dict[str, torch.Tensor] = {}
    errors: list[LayerError] = []
    residual_total = squared_total = 0.0
    for name, (_, layer) in layers.items():
        module = name.removesuffix(".diff")
        up, down, residual, squared = truncate(dense_update(layer, torch.float32), rank, dtype)
        tensors[f"{module}.lora_up.weight"] = up.contiguous()
        tensors[f"{module}.lora_down.weight"] = down.contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(float(up.shape[1]))  # fp32: exact for any rank
        errors.append(LayerError(module, up.shape[1], math.sqrt(residual / squared) if squared else 0.0))
        residual_total += residual
        squared_total += squared
    relative = math.sqrt(residual_total / squared_total) if squared_total else 0.0
    return LoRAExport(tensors, errors, relative)


def export_lora(
    delta: SparseDelta,
    path: str | os.PathLike,
    rank: int,
    max_error: float = DEFAULT_MAX_ERROR,
    naming: Naming = "ldm",
    dtype: torch.dtype | None = None,
    base: Shapes | None = None,
    base_model_version: str | None = None,
) -> LoRAExport:
    """Write ``delta`` as a rank-``rank`` LoRA to ``path`` (atomically) when its overall relative
    error is at most ``max_error``; otherwise ``SaRAError`` giving the error (nothing is written)."""
    if not (isinstance(max_error, (int, float)) and max_error >= 0):
        raise SaRAError(f"max_error must be a number >= 0, got {max_error!r}")
    export = lora_factors(delta, rank, naming, dtype, base)
    if export.relative_error > max_error:
        raise SaRAError(
            f"a rank-{rank} LoRA of this delta has {export.relative_error:.1%} relative error, above the "
            f"maximum {max_error:.1%}; nothing written. Raise the rank or the maximum error, or export "
            f"exactly with --to webui-diff\n{export.table()}"
        )
    network = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    metadata = loader_metadata(delta, Path(path).stem, base_model_version_of(delta, base_model_version), network)
    metadata["sara_relative_error"] = f"{export.relative_error:.6f}"
    with atomic_output(path) as temp:
        save_file(export.tensors, str(temp), metadata=metadata)
    export.path = Path(path)
    return export
