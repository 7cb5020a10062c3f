"""``sara-train analyze``: a UNet's |w| histogram, budget -> threshold table, and the paper's
Sec. 3.1 zeroing check."""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..engine.analysis import (
    BudgetRow,
    ZeroingRow,
    budget_threshold_table,
    magnitude_histogram,
    parse_budgets,
    zero_small_weights_effect,
)
from ..engine.config import SaRAConfig
from ..engine.errors import SaRAError
from ..engine.files import atomic_output, check_writable_folder
from ..engine.selection import find_targets
from ..plots.histogram import draw_histogram


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="diffusers folder or single-file .safetensors")
    parser.add_argument(
        "--base-config",
        type=Path,
        default=None,
        help="local diffusers folder of the same architecture (configs for a single-file --base)",
    )
    parser.add_argument(
        "--budgets",
        default="0.01,0.05,0.1",
        help="comma-separated fractions of the UNet's targeted weights (default 0.01,0.05,0.1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("sara_analysis"),
        help="folder for histogram.png, report.md, budgets.csv, zeroing.csv (default ./sara_analysis)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--latent-size",
        type=int,
        default=32,
        help="side of the random latents the UNet is run on for the zeroing check (default 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random UNet inputs")


def analyze_command(args: argparse.Namespace) -> int:
    """Histogram of the UNet's |w|, budget -> threshold table and the paper's Sec. 3.1 zeroing
    check; printed, and written to ``args.out``."""
    from ..trainer.base_model import load_base
    from ..trainer.config import parse_device

    device = parse_device(args.device)
    budgets = parse_budgets(args.budgets)
    check_writable_folder(args.out, "--out")
    base = load_base(args.base, config_dir=args.base_config, device=device)
    unet = base.unet.eval()
    config = SaRAConfig()
    weights = [getattr(t.module, t.param_name) for t in find_targets(unet, config)]
    budget_rows = budget_threshold_table(weights, budgets)
    run = unet_probe(
        unet,
        base.noise_scheduler.config.num_train_timesteps,
        base.tokenizers[0].model_max_length,
        args.latent_size,
        args.seed,
    )
    zeroing_rows = zero_small_weights_effect(unet, run, [row.threshold for row in budget_rows], config)
    edges, counts = magnitude_histogram(weights)
    image = draw_histogram(edges, counts, {f"{row.budget:.1%}": row.threshold for row in budget_rows})
    report = analysis_report(args.base, sum(w.numel() for w in weights), budget_rows, zeroing_rows)
    with atomic_output(args.out / "histogram.png") as temp:
        image.save(temp, format="PNG")
    _write_text(args.out / "report.md", report)
    _write_text(
        args.out / "budgets.csv",
        _csv(
            ["budget", "threshold", "entries", "fraction"],
            [[r.budget, r.threshold, r.entries, r.fraction] for r in budget_rows],
        ),
    )
    _write_text(
        args.out / "zeroing.csv",
        _csv(
            ["threshold", "zeroed_entries", "zeroed_fraction", "relative_change"],
            [[r.threshold, r.zeroed_entries, r.zeroed_fraction, r.relative_change] for r in zeroing_rows],
        ),
    )
    print(report)
    print(f"wrote {args.out / 'histogram.png'}, report.md, budgets.csv, zeroing.csv")
    return 0


def unet_probe(
    unet: nn.Module, num_train_timesteps: int, sequence_length: int, latent_size: int, seed: int
) -> Callable[[nn.Module], torch.Tensor]:
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
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2, device=device, dtype=dtype),
        }

    def run(model: nn.Module) -> torch.Tensor:
        return model(latents.to(device, dtype), timesteps.to(device), states.to(device, dtype), **extra).sample

    return run


def analysis_report(
    base: Path, targeted: int, budget_rows: Sequence[BudgetRow], zeroing_rows: Sequence[ZeroingRow]
) -> str:
    """The analysis as markdown: the budget -> threshold table and the zeroing table."""
    lines = [
        f"# SaRA analysis of {base}",
        "",
        f"UNet weights SaRA targets: {targeted:,} entries.",
        "",
        "## Budget -> threshold",
        "",
        "| budget | threshold | entries | of targeted |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.budget:g} | {r.threshold:.4g} | {r.entries:,} | {r.fraction:.2%} |" for r in budget_rows]
    lines += [
        "",
        "## Zeroing the weights below each threshold (paper Sec. 3.1)",
        "",
        "Relative change of the UNet's output on fixed random inputs, ||f_zeroed - f|| / ||f||.",
        "",
        "| threshold | zeroed entries | of targeted | output change |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.threshold:.4g} | {r.zeroed_entries:,} | {r.zeroed_fraction:.2%} | {r.relative_change:.3%} |"
        for r in zeroing_rows
    ]
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
