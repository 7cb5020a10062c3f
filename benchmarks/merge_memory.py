"""Peak memory of ``merge_checkpoint`` (streaming) vs loading the whole checkpoint to merge.

    python -m benchmarks.merge_memory [--size-gib 2]

Writes a synthetic fp16 checkpoint of ``--size-gib`` (tensors of 1280x2560, keys
``model.diffusion_model.*``) and a delta touching 5% of every tensor, then merges it in a fresh
process each way and reports the peak RSS of the merge itself (VmHWM reset before it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sara_train

ROWS, COLS = 1280, 2560


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_inputs(folder: Path, size_gib: float) -> tuple[Path, Path]:
    count = max(1, round(size_gib * 2**30 / (ROWS * COLS * 2)))
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"model.diffusion_model.block{i}.weight": torch.randn(ROWS, COLS, generator=generator).half()
        for i in range(count)
    }
    checkpoint = folder / "base.safetensors"
    save_file(tensors, str(checkpoint))
    layers = {}
    for key, tensor in tensors.items():
        picked = torch.randperm(tensor.numel(), generator=generator)[: tensor.numel() // 20].sort().values
        layers[key.removeprefix("model.diffusion_model.")] = sara_train.LayerDelta(
            (ROWS, COLS), picked.to(torch.int32), torch.randn(picked.numel(), generator=generator).half() * 1e-3
        )
    delta = folder / "delta.safetensors"
    sara_train.SparseDelta(layers).save(delta)
    del tensors
    return checkpoint, delta


def worker(mode: str, checkpoint: str, delta: str, out: str) -> dict:
    loaded = sara_train.SparseDelta.load(delta)
    peak_rss_reset()
    start_rss = rss_bytes("VmRSS")
    start = time.perf_counter()
    if mode == "streaming":
        sara_train.merge_checkpoint(checkpoint, loaded, out)
    else:
        state = load_file(checkpoint)
        loaded.apply_to(state)
        save_file(state, out)
    return {"mode": mode, "seconds": time.perf_counter() - start, "peak_above_start": rss_bytes("VmHWM") - start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, delta = make_inputs(Path(folder), args.size_gib)
        rows = []
        for mode in ("streaming", "load-all"):
            out = str(Path(folder) / f"{mode}.safetensors")
            result = subprocess.run(
                [sys.executable, __file__, "--worker", mode, str(checkpoint), str(delta), out],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(result.strip().splitlines()[-1]))
        mib = 2**20
        print(
            f"\ncheckpoint {checkpoint.stat().st_size / mib:.0f} MiB (fp16, largest tensor "
            f"{ROWS * COLS * 2 / mib:.1f} MiB), delta {delta.stat().st_size / mib:.0f} MiB\n"
        )
        print("| merge | peak RSS above start (MiB) | seconds |")
        print("|---|---:|---:|")
        for row in rows:
            print(f"| {row['mode']} | {row['peak_above_start'] / mib:.0f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
