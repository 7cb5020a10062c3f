"""``sara-train inspect``: what a delta holds, as text or JSON."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..engine.delta import SparseDelta
from ..families.sd_unet import unet_key_naming


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="SaRA delta (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def inspect_command(args: argparse.Namespace) -> int:
    """Print what a delta holds: totals, selection, base fingerprint, metadata, one row per layer."""
    delta = SparseDelta.load(args.file)
    if args.json:
        print(json.dumps(finite_json(delta_report(args.file, delta)), indent=2, allow_nan=False))
    else:
        print(f"{args.file}\n{delta.summary()}\nkey naming: {unet_key_naming(delta.layers) or 'other'}")
    return 0


def finite_json(value):
    """``value`` (JSON-like) with every NaN or infinite float replaced by its name as a string
    ("nan", "inf", "-inf"), so the printed JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def delta_report(path: Path, delta: SparseDelta) -> dict:
    """The JSON object ``inspect --json`` prints."""
    summary = delta.summary()
    return {
        "file": str(path),
        "layers": [
            {
                "key": key,
                "shape": list(shape),
                "entries": entries,
                "fraction": fraction,
                "bytes": nbytes,
                "dtype": str(delta.layers[key].values.dtype).removeprefix("torch."),
            }
            for key, shape, entries, fraction, nbytes in summary.layers
        ],
        "entries": summary.entries,
        "bytes": summary.nbytes,
        "selection": summary.selection,
        "base_fingerprint": summary.base_fingerprint,
        "key_naming": unet_key_naming(delta.layers) or "other",
        "metadata": summary.metadata,
    }
