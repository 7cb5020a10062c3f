"""Seconds per step and peak memory of ``sara-train train`` per model family, on the tests' tiny
pipelines (SD1.5, SDXL, SD3.5-style MMDiT, Flux.1-dev-style), each run in its own process.

    python -m benchmarks.families                      # CPU, 20 steps, batch 2, 64 px
    python -m benchmarks.families --device cuda --resolution 128 --mixed-precision bf16

Seconds per step: the median over steps 2.. of the loss log's wall-clock column (step 1 warms up).
Peak memory: the process's peak resident set (CPU), or ``torch.cuda.max_memory_allocated`` (GPU).
The pipelines are random and tiny: the numbers compare families and track regressions; they say
nothing about full-size models.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sd1", "sdxl", "sd3", "flux")


def build_base(family: str, folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline
    from tiny_sd import write_tiny_sd_pipeline

    if family == "sd3":
        return write_tiny_sd3_pipeline(folder)
    if family == "flux":
        return write_tiny_flux_pipeline(folder)
    return write_tiny_sd_pipeline(folder, "sd15" if family == "sd1" else "sdxl")


def measure_one(family: str, args: argparse.Namespace) -> dict:
    """Train ``family`` in this process; its seconds per step, peak memory and trainable entries."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from train_cli import train_args, write_image_folder

    from sara_train.cli import main
    from sara_train.engine.delta import SparseDelta
    from sara_train.trainer.logs import read_loss_log

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        base = build_base(family, root / "base")
        data = write_image_folder(root / "data", count=8, size=args.resolution + 8)
        out = root / "run"  # train_args caches in root / "cache"
        options = ["--text-tokens", "32"] if family in ("sd3", "flux") else []
        status = main(
            train_args(
                base,
                data,
                out,
                "--resolution",
                str(args.resolution),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--budget",
                "0.05",
                "--device",
                args.device,
                "--mixed-precision",
                args.mixed_precision,
                "--log-every",
                str(args.steps),
                *options,
            )
        )
        if status:
            raise SystemExit(f"{family}: sara-train exited with {status}")
        seconds = [row.seconds for row in read_loss_log(out / "loss.csv")]
        entries = SparseDelta.load(out / "sara_delta.safetensors").summary().entries
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    steps = [after - before for before, after in zip(seconds, seconds[1:])]
    return {"family": family, "seconds_per_step": statistics.median(steps), "peak_mib": peak, "entries": entries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--one", choices=FAMILIES, help=argparse.SUPPRESS)  # the per-family child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return 0
    rows = []
    for family in args.families:
        child = [sys.executable, "-m", "benchmarks.families", "--one", family, *(argv or sys.argv[1:])]
        done = subprocess.run(child, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"`python -m benchmarks.families {' '.join(argv or sys.argv[1:])}`: {args.steps} steps, batch "
        f"{args.batch_size}, {args.resolution} px, device {args.device}, mixed precision {args.mixed_precision}\n"
    )
    print("| family | trainable entries | seconds / step | peak memory (MiB) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['family']} | {row['entries']:,} | {row['seconds_per_step']:.3f} | {row['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
