"""Exact export: a delta as the LyCORIS "full" format every LoRA-folder loader reads natively.

Per touched layer one dense tensor ``lora_unet_<module>.diff`` (a bias: ``.diff_b``) of the
weight's exact shape, zero except at the delta's entries; loaders add ``strength * diff`` to the
weight. The file is about the model's size in the chosen dtype: the price of needing no extension.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.delta import LayerDelta, SparseDelta
from ..engine.files import write_safetensors_streaming
from .layers import Naming, Shapes, base_model_version_of, delta_in_naming, loader_layers, loader_metadata

DIFF_NETWORK = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: ``path``, its ``layers``, the delta's ``entries``, the file's ``nbytes``
    and the ``base_model_version`` recorded in it (None: not recorded)."""

    path: Path
    layers: int
    entries: int
    nbytes: int
    base_model_version: str | None

    def __str__(self) -> str:
        version = self.base_model_version or "unknown (not recorded: the Lora tab lists it as SD1 or Unknown)"
        return (
            f"wrote {self.path}: {self.layers} layers, {self.entries:,} entries, {self.nbytes / 2**20:.2f} MiB; "
            f"base model version {version}"
        )


def dense_update(layer: LayerDelta, dtype: torch.dtype) -> torch.Tensor:
    """The layer's update as a dense tensor of its shape: zero except ``values`` at ``flat_indices``."""
    dense = torch.zeros(layer.shape, dtype=dtype)
    dense.view(-1)[layer.flat_indices.long()] = layer.values.to(dtype)
    return dense


def values_dtype(delta: SparseDelta) -> torch.dtype:
    """The dtype of the delta's values (fp32 when its layers differ)."""
    dtypes = {layer.values.dtype for layer in delta.layers.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def diff_layers(
    delta: SparseDelta, naming: Naming = "ldm", dtype: torch.dtype | None = None, base: Shapes | None = None
) -> dict[str, LayerDelta]:
    """``{file key: layer}`` of the "full" format (``lora_unet_<module>.diff`` / ``.diff_b``), the
    values in ``dtype`` (default: the delta's own). See ``export_webui_diff`` for the arguments."""
    named = delta_in_naming(delta, naming, base).to(dtype or values_dtype(delta))  # refuses values beyond fp16's
    return {name: layer for name, (_, layer) in loader_layers(named).items()}


def diff_state_dict(
    delta: SparseDelta, dtype: torch.dtype | None = None, base: Shapes | None = None
) -> dict[str, torch.Tensor]:
    """The tensors ``export_webui_diff`` writes (ldm names), in memory: what a loader of the "full"
    format reads from the file."""
    layers = diff_layers(delta, "ldm", dtype, base)
    return {name: dense_update(layer, layer.values.dtype) for name, layer in layers.items()}


def export_webui_diff(
    delta: SparseDelta,
    path: str | os.PathLike,
    naming: Naming = "ldm",
    dtype: torch.dtype | None = None,
    base: Shapes | None = None,
    base_model_version: str | None = None,
) -> ExportReport:
    """Write ``delta`` to ``path`` in the LyCORIS "full" format, atomically, one layer at a time.

    ``naming``/``base``: see ``sara_train.export.layers.delta_in_naming``. ``dtype``: of the dense
    differences (default: the delta's own; fp16 or bf16 round each value once). ``base_model_version``:
    the ``ss_base_model_version`` to record (default: from the delta's family, when known).
    Raises ``SaRAError`` (naming, unsupported layers, values beyond the dtype's range, write errors).
    """
    dtype = dtype or values_dtype(delta)
    layers = diff_layers(delta, naming, dtype, base)
    version = base_model_version_of(delta, base_model_version)
    metadata = loader_metadata(delta, Path(path).stem, version, DIFF_NETWORK)
    layout = {name: (dtype, tuple(layer.shape)) for name, layer in layers.items()}
    written = write_safetensors_streaming(path, layout, lambda name: dense_update(layers[name], dtype), metadata)
    return ExportReport(written, len(layers), delta.num_entries, written.stat().st_size, version)
