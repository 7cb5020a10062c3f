"""Does SaRA beat LoRA here? The paper's Tables 1 and 2 and its Sec. 3.1/3.2 observations, at
glyph scale, with seeds.

    python -m benchmarks.quality --out bench-output/quality           # the full table (~150 min, 2 cores)
    python -m benchmarks.quality --quick --out /tmp/quality-quick     # every phase, tiny (~3 min)

Phases (runs go to a pool of ``--workers`` processes with one torch thread each):
  1. learning-rate sweep: each method at ``SWEEP_RATES`` on one font and a seed not used after; each
     keeps its best rate by VLHI over the sweep (the SaRA ablations use SaRA's);
  2. Table 1: SaRA, LoRA and Super-Tuning at every budget plus full fine-tuning, every font and seed;
  3. Table 2: SaRA's ablations and the largest/random selections at every budget, on the ablation fonts;
  4. Sec. 3.1 zeroing check and Sec. 3.2 persistence of the small weights.
Every finished run is appended to ``results.jsonl`` in ``--out``, the observations go to
``observations.json``; a rerun with the same ``--out`` skips what is there (so an interrupted run
resumes). The tables go to ``report.md`` there and to stdout.
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
from sara_train.evidence.experiment import TARGET_FONTS, RunSpec, run_record, score_base_model
from sara_train.evidence.methods import METHODS
from sara_train.evidence.observations import (
    PersistencePoint,
    ZeroingResult,
    small_weight_persistence,
    zeroing_check,
)
from sara_train.evidence.report import (
    Row,
    best_learning_rates,
    mean_std,
    per_font_table,
    summary_rows,
    summary_table,
    sweep_table,
)
from sara_train.plots.persistence import plot_persistence
from sara_train.plots.tradeoff import Point, plot_tradeoff

TABLE_1_METHODS = ("sara", "lora", "supertuning", "full")
ABLATION_METHODS = (
    "sara",
    "sara_no_progressive",
    "sara_no_rank",
    "sara_neither",
    "largest",
    "random",
    "sara_8bit",
    "sara_low_res",
)
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
    observations_path = args.out / "observations.json"
    observation_settings = {
        "zeroing_budgets": list(preset.zeroing_budgets),
        "sampler_steps": preset.sampler_steps,
        "persistence_steps": preset.persistence_steps,
    }
    observations = read_observations(observations_path, observation_settings)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        if observations is None:
            pending = (
                pool.submit(zeroing_check, list(preset.zeroing_budgets), preset.sampler_steps),
                pool.submit(small_weight_persistence, preset.persistence_steps, 10),
            )
        base = {font: pool.submit(score_base_model, font, preset.sampler_steps) for font in preset.fonts}
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
                spec(method, budget, font, seed, rate[method])
                for method in ABLATION_METHODS
                for budget in preset.budgets
                for font in preset.ablation_fonts
                for seed in preset.seeds
            ],
            results_path,
            pool,
        )
        base_scores = {font: future.result() for font, future in base.items()}
        if observations is None:
            zeroing = pending[0].result()
            threshold, persistence = pending[1].result()
            observations = {
                "settings": observation_settings,
                "zeroing": [asdict(row) for row in zeroing],
                "persistence": {"threshold": threshold, "points": [asdict(p) for p in persistence]},
            }
            with atomic_output(observations_path) as temp:
                temp.write_text(json.dumps(observations, indent=1))
    zeroing = [ZeroingResult(**row) for row in observations["zeroing"]]
    threshold = observations["persistence"]["threshold"]
    persistence = [PersistencePoint(**point) for point in observations["persistence"]["points"]]
    plot_persistence(
        args.out / "persistence.png",
        [p.step for p in persistence],
        [p.still_small for p in persistence],
        [p.newly_small for p in persistence],
        f"Glyph base, continued pretraining: weights below the 1% threshold ({threshold:.2g})",
    )
    plot_tradeoff(
        args.out / "tradeoff.png",
        [tradeoff_point(row) for row in summary_rows(table_1)],
        "prior drift (lower: pretraining styles kept)",
        "style Fréchet distance (lower: closer to the target font)",
        "Table 1: fit to the new font vs drift of the old ones (mean ± std over seeds)",
    )
    report = render_report(
        preset, args, base_scores, sweep, table_1, table_2, zeroing, persistence, time.monotonic() - started
    )
    with atomic_output(args.out / "report.md") as temp:
        temp.write_text(report)
    print(report)
    return 0


def tradeoff_point(row: Row) -> Point:
    """A Table 1 row as a point: prior drift (x) against style Fréchet distance (y), mean ± std."""
    (drift, drift_std), (frechet, frechet_std) = mean_std(row.per_seed["drift"]), mean_std(row.per_seed["frechet"])
    return Point(row.label, x=drift, y=frechet, x_std=drift_std, y_std=frechet_std)


def read_observations(path: Path, settings: dict) -> dict | None:
    """The observations an earlier run with the same ``settings`` saved at ``path``, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def render_report(preset, args, base_scores, sweep, table_1, table_2, zeroing, persistence, seconds: float) -> str:
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
                "## Reference: the base model, not fine-tuned",
                base_table(base_scores),
                "## Learning-rate sweep",
                sweep_table(sweep),
                "## Table 1: methods × budgets (mean over fonts; mean ± std over seeds)",
                summary_table(table_1),
                "Fit against drift: tradeoff.png.",
                "### Per font",
                per_font_table(table_1),
                "## Table 2: ablations at every budget (the ablation fonts)",
                summary_table(table_2),
                "## Sec. 3.1: zeroing the smallest weights of the base",
                "\n".join(zeroing_lines),
                "## Sec. 3.2: below-threshold weights during continued pretraining (persistence.png)",
                "\n".join(persistence_lines),
            ]
        )
        + "\n"
    )


def base_table(base_scores: dict[str, dict[str, float]]) -> str:
    lines = ["| target font | style Fréchet | pixel dist. | char. accuracy |", "|---|---:|---:|---:|"]
    for font, scores in base_scores.items():
        lines.append(f"| {font} | {scores['frechet']:.0f} | {scores['pixel']:.3f} | {scores['accuracy']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
