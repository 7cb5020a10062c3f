"""``sara-train merge``: deltas (any key naming) into a single-file checkpoint or a diffusers folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.checkpoint import merge_checkpoint
from ..engine.delta import SparseDelta, check_strength
from ..engine.files import check_output_file
from ..families.diffusers_folder import check_new_folder, merge_diffusers_folder


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        type=Path,
        help="single-file .safetensors checkpoint or diffusers folder to merge into",
    )
    parser.add_argument(
        "--delta",
        required=True,
        action="append",
        metavar="FILE[:STRENGTH]",
        help="SaRA delta file, optionally with a strength (default 1); repeat to stack deltas",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output checkpoint file (for a file --base) or new folder (for a folder --base)",
    )
    parser.add_argument(
        "--no-check-base",
        action="store_true",
        help="merge even if the base weights differ from the ones the delta was trained on",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (never an input, a folder or a special file)",
    )
    parser.add_argument(
        "--allow-repeat",
        action="store_true",
        help="merge a delta that --base records as already merged into it (adds it twice)",
    )


def merge_command(args: argparse.Namespace) -> int:
    """Write ``args.out`` = ``args.base`` + sum of strength * delta. Delta keys in LDM or diffusers
    naming both fit either kind of base. The output may not be an input or an existing file
    (unless ``--overwrite``); this is checked before anything is read."""
    base, out = Path(args.base), Path(args.out)
    specs = [parse_delta_spec(text) for text in args.delta]
    options = {"check_base": not args.no_check_base, "allow_repeat": args.allow_repeat}
    if base.is_dir():
        check_new_folder(out, base)
    else:
        check_output_file(out, [base, *(path for path, _ in specs)], args.overwrite, "--out")
    deltas = [SparseDelta.load(path) for path, _ in specs]
    strengths = [strength for _, strength in specs]
    if base.is_dir():
        merge_diffusers_folder(base, deltas, strengths, out, **options)
    else:
        merge_checkpoint(base, deltas, out, strengths, overwrite=args.overwrite, **options)
    print(f"merged {len(deltas)} delta(s) into {base} -> {out}")
    return 0


def parse_delta_spec(text: str) -> tuple[Path, float]:
    """``"file.safetensors:0.8"`` -> ``(Path("file.safetensors"), 0.8)``; no number after the last
    colon means strength 1 (so ``C:\\x.safetensors`` is a path). A strength that is not finite
    raises ``SaRAError``."""
    path, _, tail = text.rpartition(":")
    if path:
        try:
            strength = float(tail)
        except ValueError:
            return Path(text), 1.0
        return Path(path), check_strength(strength, f"the strength in --delta {text}")
    return Path(text), 1.0
