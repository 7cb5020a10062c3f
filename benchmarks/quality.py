"""Does SaRA beat LoRA here? The paper's Tables 1 and 2 and its Sec. 3.1/3.2 observations, at
glyph scale, with seeds.

    python -m benchmarks.quality --out bench-output/quality           # the full table (~95 min, 2 cores)
    python -m benchmarks.quality --quick --out /tmp/quality-quick     # every phase, tiny (~3 min)

Phases (runs go to a pool of ``--workers`` processes with one torch thread each):
  1. learning-rate sweep: each method at ``SWEEP_RATES`` on one font and a seed not used after; each
     keeps its best rate by VLHI over the sweep (the SaRA ablations use SaRA's);
  2. Table 1: SaRA, LoRA and Super-Tuning at every budget plus full fine-tuning, every font and seed;
  3. Table 2: SaRA's ablations and the largest/random selections at the middle budget;
  4. Sec. 3.1 zeroing check and Sec. 3.2 persistence of the small weights.
Every finished run is appended to ``results.jsonl`` in ``--out``; a rerun with the same ``--out``
skips them (so an interrupted run resumes). The tables go to ``report.md`` there and to stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sara_train.engine.files import atomic_output
from sara_train.evidence.experiment import TARGET_FONTS, RunSpec, run_record
from sara_train.evidence.methods import METHODS
from sara_train.evidence.observations import small_weight_persistence, zeroing_check
from sara_train.evidence.report import best_learning_rates, per_font_table, summary_table, sweep_table
from sara_train.plots.persistence import plot_persistence

TABLE_1_METHODS = ("sara", "lora", "supertuning", "full")
ABLATION_METHODS = ("sara", "sara_no_progressive", "sara_no_rank", "sara_neither", "largest", "random")
SWEEP_METHODS = ("sara", "lora", "supertuning", "full", "largest", "random")
SWEEP_RATES = {"full": (3e-5, 1e-4, 3e-4, 1e-3)}
DEFAULT_SWEEP_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
SWEEP_SEED = 100


@dataclass(frozen=True)
class Preset:
    """The size of an evidence run."""

    steps: int
    batch_size: int
    sampler_steps: int
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    fonts: tuple[str, ...]
    ablation_fonts: tuple[str, ...]
    sweep_methods: tuple[str, ...]
    sweep_rates: int
    persistence_steps: int
    zeroing_budgets: tuple[float, ...]


PRESETS = {
    "full": Preset(
        steps=80,
        batch_size=8,
        sampler_steps=10,
        budgets=(0.01, 0.05, 0.10),
        seeds=(0, 1, 2),
        fonts=tuple(TARGET_FONTS),
        ablation_fonts=("times italic",),
        sweep_methods=SWEEP_METHODS,
        sweep_rates=4,
        persistence_steps=300,
        zeroing_budgets=(0.01, 0.05, 0.10, 0.20, 0.30),
    ),
    "quick": Preset(
        steps=6,
        batch_size=4,
        sampler_steps=3,
        budgets=(0.05,),
        seeds=(0,),
        fonts=("times italic",),
        ablation_fonts=("times italic",),
        sweep_methods=("sara", "lora"),
        sweep_rates=2,
        persistence_steps=6,
        zeroing_budgets=(0.05, 0.20),
    ),
}


def sweep_rates(method: str, preset: Preset) -> tuple[float, ...]:
    return SWEEP_RATES.get(method, DEFAULT_SWEEP_RATES)[: preset.sweep_rates]


def run_all(specs: list[RunSpec], results_path: Path, pool: ProcessPoolExecutor) -> list[dict]:
    """The records of ``specs``: those already in ``results_path``, the others run in ``pool`` and
    appended to it as they finish (one JSON line each)."""
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
    todo = [spec for spec in specs if spec.key not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already done", file=sys.stderr, flush=True)
    started = time.monotonic()
    with results_path.open("a") as results:
        for count, record in enumerate(pool.map(run_record, todo), start=1):
            results.write(json.dumps(record) + "\n")
            results.flush()
            done[record["key"]] = record
            elapsed = time.monotonic() - started
            print(
                f"  [{count}/{len(todo)}] {record['key']}: Fréchet {record['frechet']:.0f}, accuracy "
                f"{record['accuracy']:.0%}, drift {record['drift']:.3f} ({elapsed / 60:.1f} min)",
                file=sys.stderr,
                flush=True,
            )
    return [done[spec.key] for spec in specs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/quality"))
    parser.add_argument("--quick", action="store_true", help="every phase at a tiny size (a smoke test)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    started = time.monotonic()

    def spec(method: str, budget: float, font: str, seed: int, rate: float) -> RunSpec:
        return RunSpec(method, budget, font, seed, rate, preset.steps, preset.batch_size, preset.sampler_steps)

    middle = preset.budgets[len(preset.budgets) // 2]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        observations = {
            "zeroing": pool.submit(zeroing_check, list(preset.zeroing_budgets), preset.sampler_steps),
            "persistence": pool.submit(small_weight_persistence, preset.persistence_steps, 10),
        }
        sweep = run_all(
            [
                spec(method, middle, preset.fonts[0], SWEEP_SEED, rate)
                for method in preset.sweep_methods
                for rate in sweep_rates(method, preset)
            ],
            results_path,
            pool,
        )
        best = best_learning_rates(sweep)
        rate = {name: best.get(name, best["sara"]) for name in METHODS}
        table_1 = run_all(
            [
                spec(method, budget, font, seed, rate[method])
                for method in TABLE_1_METHODS
                for budget in (preset.budgets if METHODS[method].budgeted else preset.budgets[:1])
                for font in preset.fonts
                for seed in preset.seeds
            ],
            results_path,
            pool,
        )
        table_2 = run_all(
            [
                spec(method, middle, font, seed, rate[method])
                for method in ABLATION_METHODS
                for font in preset.ablation_fonts
                for seed in preset.seeds
            ],
            results_path,
            pool,
        )
        zeroing = observations["zeroing"].result()
        threshold, persistence = observations["persistence"].result()
    plot_persistence(
        args.out / "persistence.png",
        [p.step for p in persistence],
        [p.still_small for p in persistence],
        [p.newly_small for p in persistence],
        f"Glyph base, continued pretraining: weights below the 1% threshold ({threshold:.2g})",
    )
    with atomic_output(args.out / "observations.json") as temp:
        temp.write_text(
            json.dumps(
                {
                    "zeroing": [asdict(row) for row in zeroing],
                    "persistence": {"threshold": threshold, "points": [asdict(p) for p in persistence]},
                },
                indent=1,
            )
        )
    report = render_report(preset, args, sweep, table_1, table_2, zeroing, persistence, time.monotonic() - started)
    with atomic_output(args.out / "report.md") as temp:
        temp.write_text(report)
    print(report)
    return 0


def render_report(preset, args, sweep, table_1, table_2, zeroing, persistence, seconds: float) -> str:
    """The markdown report: settings, machine, the tables, the observations."""
    zeroing_lines = [
        "| zeroed (smallest) | threshold | char. accuracy | drawing change | relative pixel change |",
        "|---:|---:|---:|---:|---:|",
    ] + [
        f"| {row.budget:.0%} | {row.threshold:.3g} | {row.accuracy:.1%} | {row.drawing_change:.3f} "
        f"| {row.output_change:.2%} |"
        for row in zeroing
    ]
    persistence_lines = ["| step | still small | newly small |", "|---:|---:|---:|"] + [
        f"| {p.step} | {p.still_small:.3%} | {p.newly_small:.3%} |"
        for p in persistence
        if p.step in (0, persistence[-1].step) or p.step % max(10, persistence[-1].step // 6) == 0
    ]
    return (
        "\n\n".join(
            [
                "# Evidence run",
                f"Preset: {'quick' if args.quick else 'full'} ({json.dumps(asdict(preset))}). "
                f"Machine: {platform.machine()}, {args.workers} worker process(es) × 1 torch thread, torch "
                f"{torch.__version__}. Wall time: {seconds / 60:.1f} min.",
                "## Learning-rate sweep",
                sweep_table(sweep),
                "## Table 1: methods × budgets (mean over fonts; mean ± std over seeds)",
                summary_table(table_1),
                "### Per font",
                per_font_table(table_1),
                "## Table 2: ablations at the middle budget",
                summary_table(table_2),
                "## Sec. 3.1: zeroing the smallest weights of the base",
                "\n".join(zeroing_lines),
                "## Sec. 3.2: below-threshold weights during continued pretraining (persistence.png)",
                "\n".join(persistence_lines),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
