"""``sara-train`` (also ``python -m sara_train``): train, merge, export, inspect and analyze SaRA deltas.

One module per subcommand (``train``, ``merge``, ``export``, ``inspect``, ``analyze``), each an
``add_<name>_arguments(parser)`` and a ``<name>_command(args) -> int``: parse, call the library,
report. Errors the user can fix (``SaRAError``) print one line and exit with status 2. SIGINT or
SIGTERM at any moment of ``train`` saves the last completed step (delta and resume state), prints
one line and exits with status 130 / 143; the other commands leave no output file and exit the same.
"""

from __future__ import annotations

import argparse
import sys

from ..engine.errors import SaRAError
from ..trainer.interrupts import Interrupted, StopSignals
from . import analyze, export, inspect, merge, train


def build_parser() -> argparse.ArgumentParser:
    from ..trainer.config import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="sara-train",
        description="Train, merge, export, inspect and analyze SaRA deltas.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_arguments(
        commands.add_parser(
            "train",
            help="fine-tune a Stable Diffusion model with SaRA on an image folder",
            description="Fine-tune the UNet of a Stable Diffusion model (SD1.x, SD2.x, SDXL) with SaRA. Options "
            "come from --config FILE (TOML) and/or flags.",
        )
    )
    merge.add_merge_arguments(commands.add_parser("merge", help="add deltas to a checkpoint (streaming)"))
    export.add_export_arguments(
        commands.add_parser("export", help="write a delta as a file webuis and LoRA loaders read (exact or LoRA)")
    )
    inspect.add_inspect_arguments(commands.add_parser("inspect", help="summarise a delta file"))
    analyze.add_analyze_arguments(commands.add_parser("analyze", help="weight magnitudes and thresholds of a model"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "train": train.run_train,
        "merge": merge.merge_command,
        "export": export.export_command,
        "inspect": inspect.inspect_command,
        "analyze": analyze.analyze_command,
    }
    with StopSignals():
        try:
            return commands[args.command](args) or 0
        except SaRAError as error:
            print(f"sara-train {args.command}: error: {error}", file=sys.stderr)
            return 2
        except Interrupted as stop:  # merge / analyze: their writes are atomic, so nothing partial is left
            print(
                f"\nsara-train {args.command}: {stop.signal_name}: stopped; no output file was written",
                file=sys.stderr,
            )
            return stop.exit_status
