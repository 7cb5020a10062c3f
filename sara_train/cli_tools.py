"""The ``sara-train merge``, ``inspect`` and ``analyze`` subcommands.

Each subcommand is an ``add_<name>_arguments(parser)`` that declares its options and a
``<name>_command(args) -> int`` that does the work, prints its results to stdout and returns the exit
status 0. Bad input raises ``SaRAError`` with a one-line message (``sara_train.cli`` prints it).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .analysis import (BudgetRow, ZeroingRow, budget_threshold_table, draw_histogram, magnitude_histogram,
                       zero_small_weights_effect)
from .checkpoint import merge_checkpoint
from .config import SaRAConfig
from .delta import SparseDelta, check_strength, printable
from .errors import DeltaMismatchError, SaRAError
from .files import atomic_output, check_output_file, check_writable_folder, read_safetensors_header
from .ldm_keys import delta_for_unet, unet_key_naming, unet_layout_from_ldm_keys
from .selection import find_targets

PICKLED_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
"""UNet weight files a merged diffusers folder leaves out: never read, and they would be stale."""


# ------------------------------------------------------------------------------------------ merge
def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path,
                        help="single-file .safetensors checkpoint or diffusers folder to merge into")
    parser.add_argument("--delta", required=True, action="append", metavar="FILE[:STRENGTH]",
                        help="SaRA delta file, optionally with a strength (default 1); repeat to stack deltas")
    parser.add_argument("--out", required=True, type=Path,
                        help="output checkpoint file (for a file --base) or new folder (for a folder --base)")
    parser.add_argument("--no-check-base", action="store_true",
                        help="merge even if the base weights differ from the ones the delta was trained on")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never an input, a folder or a special file)")
    parser.add_argument("--allow-repeat", action="store_true",
                        help="merge a delta that --base records as already merged into it (adds it twice)")


def merge_command(args: argparse.Namespace) -> int:
    """Write ``args.out`` = ``args.base`` + sum of strength * delta. Delta keys in LDM or diffusers
    naming both fit either kind of base. The output may not be an input or an existing file
    (unless ``--overwrite``); this is checked before anything is read."""
    base, out = Path(args.base), Path(args.out)
    specs = [parse_delta_spec(text) for text in args.delta]
    options = dict(check_base=not args.no_check_base, allow_repeat=args.allow_repeat)
    if base.is_dir():
        check_new_folder(out, base)
    else:
        check_output_file(out, [base, *(path for path, _ in specs)], args.overwrite, "--out")
    deltas = [SparseDelta.load(path) for path, _ in specs]
    strengths = [strength for _, strength in specs]
    if base.is_dir():
        merge_diffusers_folder(base, deltas, strengths, out, **options)
    else:
        merge_single_file(base, deltas, strengths, out, overwrite=args.overwrite, **options)
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


def check_new_folder(out: Path, base: Path) -> None:
    """``SaRAError`` unless ``out`` is a new folder outside the folder ``base`` it is made from."""
    if out.exists() or out.is_symlink():
        raise SaRAError(f"--out {out} already exists; give a new folder name")
    resolved_base = base.resolve()
    if resolved_base == out.resolve() or resolved_base in out.resolve().parents:
        raise SaRAError(f"--out {out} is inside --base {base}; write the merged folder elsewhere")


def merge_single_file(base: Path, deltas: Sequence[SparseDelta], strengths: Sequence[float], out: Path,
                      check_base: bool = True, overwrite: bool = False, allow_repeat: bool = False) -> Path:
    """Stream ``base`` (single-file .safetensors) plus the deltas into ``out``, atomically.

    A delta whose keys do not match the checkpoint is renamed between diffusers and LDM naming,
    the UNet layout being read off the checkpoint's ``model.diffusion_model.*`` keys.
    """
    header = read_safetensors_header(base)
    try:
        layout = unet_layout_from_ldm_keys(header.tensors)
    except SaRAError:  # not a Stable Diffusion checkpoint: keys can still match as they are
        layout = None
    naming = None if layout is None else "ldm"
    matched = [delta_for_unet(delta, header.tensors, f"checkpoint {base}", naming, layout) for delta in deltas]
    return merge_checkpoint(base, matched, out, list(strengths), check_base, overwrite, allow_repeat)


def merge_diffusers_folder(base: Path, deltas: Sequence[SparseDelta], strengths: Sequence[float], out: Path,
                           check_base: bool = True, allow_repeat: bool = False) -> Path:
    """Write a new diffusers folder ``out``: ``base`` with the deltas merged into its UNet weights.

    Every complete copy of the UNet weights in ``base/unet`` (one file, or the shards of one
    ``*.safetensors.index.json``; each variant such as fp16) is merged, streaming, shard by shard;
    all other files are copied. Pickled UNet weights (.bin) are left out. Keys, shapes and names
    are checked before anything is copied; the folder is built beside ``out`` and renamed into
    place, so ``out`` appears complete or not at all. Raises ``SaRAError`` if ``out`` exists or is
    inside ``base``, or ``base`` holds a symbolic-link loop.
    """
    unet_dir = base / "unet"
    if not (base / "model_index.json").is_file() or not (unet_dir / "config.json").is_file():
        raise SaRAError(f"{base} is not a diffusers pipeline folder (needs model_index.json and unet/config.json)")
    check_new_folder(out, base)
    try:
        unet_config = json.loads((unet_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SaRAError(f"{unet_dir / 'config.json'}: cannot read the UNet config ({exc})") from None
    plan: list[tuple[Path, list[SparseDelta]]] = []
    for group in unet_weight_groups(unet_dir):
        headers = [read_safetensors_header(path) for path in group]
        owner = {key: header for header in headers for key in header.tensors}
        matched = [delta_for_unet(delta, owner, f"UNet weights {group[0]}", "diffusers", unet_config)
                   for delta in deltas]
        for delta in matched:
            for key, layer in delta.layers.items():
                entry = owner[key].tensors[key]
                if entry.shape != tuple(layer.shape):
                    raise DeltaMismatchError(f"delta layer for {key!r} has shape {layer.shape} but {owner[key].path} "
                                             f"has {entry.shape}: the delta is for another model")
        for header in headers:
            plan.append((header.path, [SparseDelta({k: v for k, v in d.layers.items() if owner[k] is header},
                                                   d.selection, d.metadata) for d in matched]))
    merged_names = {path.name for path, _ in plan}

    def skip_unet_weights(folder: Path, name: str) -> bool:
        return folder == unet_dir.resolve() and (name in merged_names or name.endswith(PICKLED_WEIGHT_SUFFIXES))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise SaRAError(f"could not write {out}: {error.strerror or error}") from None
    try:
        copy_folder(base, temp, skip_unet_weights)
        for path, parts in plan:
            if any(part.layers for part in parts):
                merge_checkpoint(path, parts, temp / "unet" / path.name, list(strengths), check_base,
                                 allow_repeat=allow_repeat)
            else:
                shutil.copy2(path, temp / "unet" / path.name)
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def copy_folder(source: Path, target: Path, skip: Callable[[Path, str], bool]) -> None:
    """Copy the tree ``source`` into the existing folder ``target``, following symbolic links (a
    Hugging Face snapshot is made of them) but refusing a link back into a folder being copied;
    ``skip(resolved folder, name)`` leaves entries out. Raises ``SaRAError`` for a link loop or an
    unreadable or unwritable entry."""
    def copy(folder: Path, into: Path, ancestors: frozenset[Path]) -> None:
        resolved = folder.resolve()
        if resolved in ancestors:
            raise SaRAError(f"{folder} links back to a folder that contains it (a symbolic-link loop); "
                            f"sara-train will not copy it")
        for entry in sorted(folder.iterdir()):
            if skip(resolved, entry.name):
                continue
            if entry.is_dir():
                (into / entry.name).mkdir()
                copy(entry, into / entry.name, ancestors | {resolved})
            else:
                shutil.copy2(entry, into / entry.name)

    try:
        copy(source, target, frozenset())
    except OSError as error:
        raise SaRAError(f"cannot copy {source}: {error}") from None


def unet_weight_groups(unet_dir: Path) -> list[list[Path]]:
    """Each complete copy of the UNet's safetensors weights: the shards named by one index file,
    or one unsharded file. Raises ``SaRAError`` if there is none."""
    groups: list[list[Path]] = []
    sharded: set[Path] = set()
    for index in sorted(unet_dir.glob("*.safetensors.index.json")):
        try:
            shards = sorted({unet_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SaRAError(f"{index}: not a valid safetensors index ({exc})") from None
        groups.append(shards)
        sharded.update(shards)
    groups += [[path] for path in sorted(unet_dir.glob("*.safetensors")) if path not in sharded]
    if not groups:
        raise SaRAError(f"{unet_dir} has no .safetensors weights (sara-train never reads pickled .bin files)")
    return groups


# ---------------------------------------------------------------------------------------- inspect
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
        "layers": [{"key": key, "shape": list(shape), "entries": entries, "fraction": fraction, "bytes": nbytes,
                    "dtype": str(delta.layers[key].values.dtype).removeprefix("torch.")}
                   for key, shape, entries, fraction, nbytes in summary.layers],
        "entries": summary.entries,
        "bytes": summary.nbytes,
        "selection": summary.selection,
        "base_fingerprint": summary.base_fingerprint,
        "key_naming": unet_key_naming(delta.layers) or "other",
        "metadata": summary.metadata,
    }


# ---------------------------------------------------------------------------------------- analyze
def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="diffusers folder or single-file .safetensors")
    parser.add_argument("--base-config", type=Path, default=None,
                        help="local diffusers folder of the same architecture (configs for a single-file --base)")
    parser.add_argument("--budgets", type=parse_budgets, default=[0.01, 0.05, 0.1],
                        help="comma-separated fractions of the UNet's targeted weights (default 0.01,0.05,0.1)")
    parser.add_argument("--out", type=Path, default=Path("sara_analysis"),
                        help="folder for histogram.png, report.md, budgets.csv, zeroing.csv (default ./sara_analysis)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent-size", type=int, default=32,
                        help="side of the random latents the UNet is run on for the zeroing check (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random UNet inputs")


def parse_budgets(text: str) -> list[float]:
    """``"0.01,0.05"`` -> ``[0.01, 0.05]``; each in (0, 1]. Raises ``argparse.ArgumentTypeError``."""
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated fractions like 0.01,0.05, got {text!r}")
    if not budgets or not all(0.0 < b <= 1.0 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    return budgets


def analyze_command(args: argparse.Namespace) -> int:
    """Histogram of the UNet's |w|, budget -> threshold table and the paper's Sec. 3.1 zeroing
    check; printed, and written to ``args.out``."""
    from .trainer.base import load_base
    from .trainer.config import parse_device

    device = parse_device(args.device)
    check_writable_folder(args.out, "--out")
    base = load_base(args.base, config_dir=args.base_config, device=device)
    unet = base.unet.eval()
    config = SaRAConfig()
    weights = [getattr(t.module, t.param_name) for t in find_targets(unet, config)]
    budget_rows = budget_threshold_table(weights, args.budgets)
    run = unet_probe(unet, base.noise_scheduler.config.num_train_timesteps, base.tokenizers[0].model_max_length,
                     args.latent_size, args.seed)
    zeroing_rows = zero_small_weights_effect(unet, run, [row.threshold for row in budget_rows], config)
    edges, counts = magnitude_histogram(weights)
    image = draw_histogram(edges, counts, {f"{row.budget:.1%}": row.threshold for row in budget_rows})
    report = analysis_report(args.base, sum(w.numel() for w in weights), budget_rows, zeroing_rows)
    with atomic_output(args.out / "histogram.png") as temp:
        image.save(temp, format="PNG")
    _write_text(args.out / "report.md", report)
    _write_text(args.out / "budgets.csv", _csv(["budget", "threshold", "entries", "fraction"],
                                               [[r.budget, r.threshold, r.entries, r.fraction] for r in budget_rows]))
    _write_text(args.out / "zeroing.csv", _csv(
        ["threshold", "zeroed_entries", "zeroed_fraction", "relative_change"],
        [[r.threshold, r.zeroed_entries, r.zeroed_fraction, r.relative_change] for r in zeroing_rows]))
    print(report)
    print(f"wrote {args.out / 'histogram.png'}, report.md, budgets.csv, zeroing.csv")
    return 0


def unet_probe(unet: nn.Module, num_train_timesteps: int, sequence_length: int, latent_size: int,
               seed: int) -> Callable[[nn.Module], torch.Tensor]:
    """A deterministic ``run(unet) -> noise prediction`` on fixed random inputs of the UNet's shapes.

    Inputs (seeded, batch 2): latents [2, C, s, s] with ``s = min(latent_size, sample_size)``,
    timesteps in ``[0, num_train_timesteps)``, text states [2, sequence_length, cross_attention_dim]
    and, for SDXL, pooled text embeddings and the time ids of an s*8 px square image.
    """
    config = unet.config
    size = min(latent_size, config.sample_size)
    factor = 2 ** (len(config.block_out_channels) - 1)
    if size < factor or size % factor:
        raise SaRAError(f"--latent-size {size} must be a multiple of {factor} for this UNet")
    generator = torch.Generator().manual_seed(seed)
    device, dtype = unet.device, unet.dtype
    latents = torch.randn(2, config.in_channels, size, size, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (2,), generator=generator)
    states = torch.randn(2, sequence_length, config.cross_attention_dim, generator=generator)
    extra: dict = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pixels = float(size * 8)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled_dim, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2, device=device, dtype=dtype)}

    def run(model: nn.Module) -> torch.Tensor:
        return model(latents.to(device, dtype), timesteps.to(device), states.to(device, dtype), **extra).sample

    return run


def analysis_report(base: Path, targeted: int, budget_rows: Sequence[BudgetRow],
                    zeroing_rows: Sequence[ZeroingRow]) -> str:
    """The analysis as markdown: the budget -> threshold table and the zeroing table."""
    lines = [f"# SaRA analysis of {base}", "", f"UNet weights SaRA targets: {targeted:,} entries.", "",
             "## Budget -> threshold", "", "| budget | threshold | entries | of targeted |", "|---|---|---|---|"]
    lines += [f"| {r.budget:g} | {r.threshold:.4g} | {r.entries:,} | {r.fraction:.2%} |" for r in budget_rows]
    lines += ["", "## Zeroing the weights below each threshold (paper Sec. 3.1)", "",
              "Relative change of the UNet's output on fixed random inputs, ||f_zeroed - f|| / ||f||.", "",
              "| threshold | zeroed entries | of targeted | output change |", "|---|---|---|---|"]
    lines += [f"| {r.threshold:.4g} | {r.zeroed_entries:,} | {r.zeroed_fraction:.2%} | {r.relative_change:.3%} |"
              for r in zeroing_rows]
    return "\n".join(lines) + "\n"


def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as temp:
        temp.write_text(text)
