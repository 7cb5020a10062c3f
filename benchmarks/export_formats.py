"""File size and error of each export of a delta: the sparse file, the exact LyCORIS "full"
difference (fp16, fp32) and rank-R LoRAs by SVD.

    python -m benchmarks.export_formats demo-output/delta.safetensors other.safetensors
    python -m benchmarks.export_formats DELTA --ranks 4 16 64 256

For each delta file, one Markdown table: format, MiB on disk, size relative to the sparse file,
and the relative Frobenius error of what a loader adds (0 for the exact formats; for a LoRA the
overall error over all layers, and the worst layer's). Files are written to a temporary folder,
with the layer names the delta has (the demo's delta is diffusers-named).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sara_train import SparseDelta
from sara_train.export import export_lora, export_webui_diff
from sara_train.export.layers import own_naming


def rows_for(path: Path, ranks: list[int]) -> list[tuple[str, float, float, str, str]]:
    """``(format, MiB, x sparse, overall error, worst layer error)`` for one delta file."""
    delta = SparseDelta.load(path)
    naming = own_naming(list(delta.layers)) or "ldm"  # sizes and errors do not depend on the names
    sparse = path.stat().st_size
    rows = [("sparse SaRA file", sparse / 2**20, 1.0, "0 (exact)", "0")]
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            report = export_webui_diff(delta, Path(folder) / f"full_{name}.safetensors", naming, dtype)
            error = "0 (exact)" if dtype == torch.float32 else "fp16 rounding"
            rows.append((f"webui-diff {name}", report.nbytes / 2**20, report.nbytes / sparse, error, "-"))
        for rank in ranks:
            out = Path(folder) / f"lora_{rank}.safetensors"
            export = export_lora(delta, out, rank, 1.0, naming, torch.float16)
            worst = max(layer.relative_error for layer in export.layers)
            size = out.stat().st_size
            rows.append(
                (f"LoRA rank {rank} fp16", size / 2**20, size / sparse, f"{export.relative_error:.1%}", f"{worst:.1%}")
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deltas", nargs="+", type=Path, help="SaRA delta files")
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 16, 64, 256])
    args = parser.parse_args()
    for path in args.deltas:
        delta = SparseDelta.load(path)
        print(f"\n{path}: {len(delta.layers)} layers, {delta.num_entries:,} entries\n")
        print("| format | MiB | × sparse | relative error | worst layer |")
        print("|---|---:|---:|---:|---:|")
        for name, mib, ratio, error, worst in rows_for(path, args.ranks):
            print(f"| {name} | {mib:.2f} | {ratio:.2f} | {error} | {worst} |")


if __name__ == "__main__":
    main()
