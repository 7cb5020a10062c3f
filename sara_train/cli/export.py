"""``sara-train export``: a delta as a file LoRA-folder loaders read (A1111, Forge, reForge,
ComfyUI's LoraLoader, SD.Next): exact (``webui-diff``) or a rank-R LoRA with its error."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.delta import DTYPES, SparseDelta
from ..engine.files import check_output_file
from ..export import DEFAULT_MAX_ERROR, export_lora, export_webui_diff
from ..export.layers import NAMINGS
from ..families.diffusers_folder import model_tensor_shapes

FORMATS = ("webui-diff", "lora")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("delta", type=Path, help="SaRA delta file (.safetensors)")
    parser.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="webui-diff: exact, the LyCORIS 'full' format (a dense difference per layer, about the model's size); "
        "lora: a rank-R LoRA by SVD, approximate, with its error printed",
    )
    parser.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument(
        "--naming",
        choices=NAMINGS,
        default="ldm",
        help="layer names: ldm (A1111, Forge, reForge, ComfyUI) or diffusers (SD.Next; SD1/SD2/SDXL only)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written values (default: the delta's own)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (--to lora)")
    parser.add_argument(
        "--max-error",
        type=float,
        default=DEFAULT_MAX_ERROR,
        help="refuse a LoRA whose overall relative Frobenius error is above this (--to lora)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="the base model (checkpoint file or diffusers folder): needed to translate between namings",
    )
    parser.add_argument(
        "--base-model-version",
        help="ss_base_model_version to record (sd_v1, sd_v2, sdxl_base_v1-0, ...); default: from the delta",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def export_command(args: argparse.Namespace) -> int:
    """Write ``args.out`` from ``args.delta`` and print what was written (sizes; the LoRA's errors)."""
    check_output_file(args.out, [args.delta, *([args.base] if args.base else [])], args.overwrite, "--out")
    delta = SparseDelta.load(args.delta)
    base = model_tensor_shapes(args.base) if args.base else None
    dtype = DTYPES[args.dtype] if args.dtype else None
    options = {"naming": args.naming, "dtype": dtype, "base": base, "base_model_version": args.base_model_version}
    if args.to == "webui-diff":
        print(export_webui_diff(delta, args.out, **options))
    else:
        export = export_lora(delta, args.out, args.rank, args.max_error, **options)
        print(export.table())
        print(f"wrote {args.out}: rank {args.rank}, {len(export.layers)} layers")
    size, sparse = args.out.stat().st_size, args.delta.stat().st_size
    ratio = f"{size / sparse:.2f}x the sparse file {args.delta} ({sparse / 2**20:.2f} MiB)"
    print(f"{args.out}: {size / 2**20:.2f} MiB, {ratio}")
    return 0
