"""Tables from run records (``experiment.run_record`` dicts): mean ± std over seeds, VLHI within
each comparison, and the learning-rate choice of a sweep."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .experiment import vlhi
from .methods import METHODS

METRICS = ("frechet", "pixel", "accuracy", "drift", "vlhi")
HEADERS = {
    "frechet": "style Fréchet ↓",
    "pixel": "pixel dist. ↓",
    "accuracy": "char. accuracy ↑",
    "drift": "prior drift ↓",
    "vlhi": "VLHI ↑",
}


def row_label(record: dict) -> str:
    """``"SaRA @ 5%"``; full fine-tuning has no budget."""
    method = METHODS[record["method"]]
    return method.label if not method.budgeted else f"{method.label} @ {record['budget']:.0%}"


def with_vlhi(records: Sequence[dict]) -> list[dict]:
    """Copies of ``records`` with ``"vlhi"`` added, computed among the records of the same font and
    seed (one comparison: the models of one table column, as in the paper)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["font"], record["seed"]].append(dict(record))
    scored = []
    for group in groups.values():
        values = vlhi([r["frechet"] for r in group], [r["accuracy"] for r in group]) if len(group) > 1 else [0.0]
        for record, value in zip(group, values):
            record["vlhi"] = value
            scored.append(record)
    return scored


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(metric: str, values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if metric == "frechet":
        return f"{mean:.0f} ± {std:.0f}"
    if metric == "accuracy":
        return f"{mean:.1%} ± {std:.1%}"
    if metric == "vlhi":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


@dataclass(frozen=True)
class Row:
    """One method and budget over several fonts and seeds: ``per_seed[metric]`` holds, per seed, the
    mean over fonts; ``trainable`` the mean trainable count; ``seeds`` and ``fonts`` the counts."""

    label: str
    per_seed: dict[str, list[float]]
    trainable: float
    seeds: int
    fonts: int


def summary_rows(records: Sequence[dict]) -> list[Row]:
    """``Row`` per method and budget, in first-seen order; VLHI computed per font and seed."""
    grouped: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in with_vlhi(records):
        grouped[row_label(record)][record["seed"]].append(record)
    rows = []
    for label, by_seed in grouped.items():
        per_seed = {m: [statistics.fmean(r[m] for r in group) for group in by_seed.values()] for m in METRICS}
        all_records = [r for group in by_seed.values() for r in group]
        trainable = statistics.fmean(r["trainable"] for r in all_records)
        rows.append(Row(label, per_seed, trainable, len(by_seed), len({r["font"] for r in all_records})))
    return rows


def summary_table(records: Sequence[dict], metrics: Sequence[str] = METRICS) -> str:
    """One line per ``summary_rows`` row: trainable entries and each metric as mean ± std over seeds
    of the per-seed mean over fonts."""
    lines = [
        "| method | trainable | " + " | ".join(HEADERS[m] for m in metrics) + " | seeds × fonts |",
        "|---|---:|" + "---:|" * len(metrics) + "---:|",
    ]
    for row in summary_rows(records):
        cells = " | ".join(_cell(m, row.per_seed[m]) for m in metrics)
        lines.append(f"| {row.label} | {row.trainable:,.0f} | {cells} | {row.seeds} × {row.fonts} |")
    return "\n".join(lines)


def per_font_table(records: Sequence[dict], metrics: Sequence[str] = ("frechet", "accuracy", "vlhi")) -> str:
    """Rows as ``summary_table``; per target font, each metric as mean ± std over seeds."""
    scored = with_vlhi(records)
    fonts = list(dict.fromkeys(r["font"] for r in scored))
    cells: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in scored:
        cells[row_label(record)][record["font"]].append(record)
    header = "| method | " + " | ".join(f"{font}: {HEADERS[m]}" for font in fonts for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * (len(fonts) * len(metrics))]
    for label, by_font in cells.items():
        values = [_cell(m, [r[m] for r in by_font[font]]) if by_font[font] else "-" for font in fonts for m in metrics]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def best_learning_rates(sweep: Sequence[dict]) -> dict[str, float]:
    """Each method's learning rate with the highest VLHI (mean over the sweep's seeds and fonts),
    VLHI computed over every run of the sweep together."""
    scored = with_vlhi(sweep)
    by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in scored:
        by_method[record["method"]][record["learning_rate"]].append(record["vlhi"])
    return {method: max(rates, key=lambda rate: statistics.fmean(rates[rate])) for method, rates in by_method.items()}


def sweep_table(sweep: Sequence[dict]) -> str:
    """One row per method and learning rate with its metrics (VLHI over the whole sweep); the rate
    ``best_learning_rates`` picks is marked."""
    scored = with_vlhi(sweep)
    best = best_learning_rates(sweep)
    lines = [
        "| method | learning rate | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for record in sorted(scored, key=lambda r: (list(METHODS).index(r["method"]), r["learning_rate"])):
        chosen = " **(chosen)**" if best[record["method"]] == record["learning_rate"] else ""
        cells = " | ".join(_cell(m, [record[m]]).split(" ± ")[0] for m in METRICS)
        lines.append(f"| {METHODS[record['method']].label} | {record['learning_rate']:g}{chosen} | {cells} |")
    return "\n".join(lines)
