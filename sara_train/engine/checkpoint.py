"""Streaming merge of SaRA deltas into a single-file ``.safetensors`` checkpoint.

The output keeps the input's header (same dtypes, shapes, offsets) plus merge metadata. Tensor
bytes are copied through in chunks; only tensors a delta touches are materialised, one at a time,
so peak memory is about the largest touched tensor plus the delta, never the whole checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .apply import add_sparse_, check_layer_fits, fit_delta, load_deltas
from .delta import SparseDelta
from .errors import DeltaMismatchError, SaRAError
from .files import (
    SAFETENSORS_DTYPES,
    atomic_output,
    check_output_file,
    encode_safetensors_header,
    read_safetensors_header,
)

COPY_CHUNK_BYTES = 64 * 1024 * 1024


MERGE_RECORD_KEY = "sara_merged"
"""Checkpoint metadata key listing the deltas merged into it: a JSON list of
``{"delta": content hash, "strength": s, "entries": n}``, one per delta, oldest first."""


def merge_checkpoint(
    ckpt_in: str | os.PathLike,
    delta: SparseDelta | str | os.PathLike | Sequence[SparseDelta | str | os.PathLike],
    ckpt_out: str | os.PathLike,
    strength: float | Sequence[float] = 1.0,
    check_base: bool = True,
    overwrite: bool = False,
    allow_repeat: bool = False,
) -> Path:
    """Write ``ckpt_out`` = ``ckpt_in`` with ``strength * delta`` added; atomically.

    ``delta`` is one delta or a list (objects or file paths), ``strength`` one finite number or one
    per delta. Each delta is fitted to the checkpoint's tensors (``fit_delta``: exactly, via one
    prefix such as ``model.diffusion_model.``, or through a model family's key naming).
    The output records what was merged (``MERGE_RECORD_KEY``), so merging a delta into a
    checkpoint that already holds it is refused unless ``allow_repeat``.
    ``ckpt_out`` may not be an input file, nor an existing file unless ``overwrite``.
    Raises ``DeltaMismatchError`` (keys, shapes, base weights, a repeated merge) or ``SaRAError``
    (bad files or paths) before anything is written; on any failure ``ckpt_out`` is not created
    or changed.
    """
    items = list(delta) if isinstance(delta, (list, tuple)) else [delta]
    strengths = list(strength) if isinstance(strength, (list, tuple)) else [strength] * len(items)
    check_output_file(
        ckpt_out,
        [ckpt_in, *(item for item in items if not isinstance(item, SparseDelta))],
        overwrite,
        "checkpoint output",
    )
    header = read_safetensors_header(ckpt_in)
    shapes = {name: entry.shape for name, entry in header.tensors.items()}
    deltas = [fit_delta(item, shapes, f"checkpoint {ckpt_in}") for item in load_deltas(items)]
    combined = SparseDelta.stack(deltas, strengths, check_base=check_base)
    for ckpt_key in combined.layers:
        stored = header.tensors[ckpt_key].dtype
        if stored.startswith("F8"):
            raise DeltaMismatchError(
                f"checkpoint tensor {ckpt_key!r} is stored in fp8 ({stored}): the merged values would be "
                "rounded to fp8's 3-bit mantissa, which loses most of a SaRA update. Merge into the "
                "bf16/fp16/fp32 file of the model (and quantise the result afterwards if you need fp8)"
            )
        if stored not in ("F32", "F16", "BF16", "F64"):
            raise DeltaMismatchError(f"checkpoint tensor {ckpt_key!r} has dtype {stored}, not a float SaRA can add to")
    records = merge_records(header.metadata)
    for delta_item, item_strength in zip(deltas, strengths):
        content = delta_item.content_hash()
        earlier = [record for record in records if record.get("delta") == content]
        if earlier and not allow_repeat:
            raise DeltaMismatchError(
                f"{ckpt_in} already holds this delta (merged at strength {earlier[0].get('strength')}); merging "
                f"it again would add it twice. Merge into the original checkpoint, or allow a repeated merge"
            )
        records.append({"delta": content, "strength": float(item_strength), "entries": delta_item.num_entries})
    metadata = dict(header.metadata)
    metadata[MERGE_RECORD_KEY] = json.dumps(records)
    entries = {name: (e.dtype, e.shape, e.begin, e.end) for name, e in header.tensors.items()}
    with atomic_output(ckpt_out) as temp, open(header.path, "rb") as source, open(temp, "wb") as out:
        out.write(encode_safetensors_header(entries, metadata))
        position = 0
        for name, entry in header.tensors.items():
            if entry.begin != position:
                raise SaRAError(f"{ckpt_in}: tensor {name!r} does not start where the previous one ends")
            source.seek(header.data_start + entry.begin)
            layer = combined.layers.get(name)
            if layer is None:
                _copy_bytes(source, out, entry.end - entry.begin)
            else:
                buffer = bytearray(source.read(entry.end - entry.begin))
                dtype = SAFETENSORS_DTYPES[entry.dtype]
                tensor = (
                    torch.frombuffer(buffer, dtype=dtype).view(entry.shape)
                    if buffer
                    else torch.empty(entry.shape, dtype=dtype)
                )
                check_layer_fits(name, layer, tensor, check_base)
                add_sparse_(tensor, layer, 1.0)
                out.write(buffer)
            position = entry.end
    return Path(ckpt_out)


def merge_records(metadata: dict[str, str]) -> list[dict]:
    """The deltas a checkpoint's metadata says were merged into it (see ``MERGE_RECORD_KEY``);
    an unreadable record counts as none."""
    try:
        records = json.loads(metadata.get(MERGE_RECORD_KEY, "[]"))
    except (ValueError, RecursionError):
        return []
    return [record for record in records if isinstance(record, dict)] if isinstance(records, list) else []


def _copy_bytes(source, out, count: int) -> None:
    while count > 0:
        chunk = source.read(min(COPY_CHUNK_BYTES, count))
        if not chunk:
            raise SaRAError(f"{source.name} ended early while copying tensor data")
        out.write(chunk)
        count -= len(chunk)
