"""``sara-train`` (also ``python -m sara_train``): train, merge, inspect and analyze SaRA deltas.

A thin layer over ``sara_train.trainer`` and ``sara_train.cli_tools``: parse, run, report. Errors
the user can fix (``SaRAError``) print one line and exit with status 2. Ctrl-C (SIGINT) or SIGTERM
at any moment of ``train`` saves the last completed step (delta and resume state), prints one line
and exits with status 130 / 143.
"""
from __future__ import annotations

import argparse
import sys

from .errors import SaRAError


def build_parser() -> argparse.ArgumentParser:
    from . import cli_tools
    from .trainer.config import add_train_arguments

    parser = argparse.ArgumentParser(prog="sara-train", description="Train, merge, inspect and analyze SaRA deltas.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="fine-tune a Stable Diffusion model with SaRA on an image folder",
                                description="Fine-tune the UNet of a Stable Diffusion model (SD1.x, SD2.x, SDXL) "
                                            "with SaRA. Options come from --config FILE (TOML) and/or flags.")
    add_train_arguments(train)
    cli_tools.add_merge_arguments(commands.add_parser("merge", help="add deltas to a checkpoint (streaming)"))
    cli_tools.add_inspect_arguments(commands.add_parser("inspect", help="summarise a delta file"))
    cli_tools.add_analyze_arguments(commands.add_parser("analyze", help="weight magnitudes and thresholds of a model"))
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .trainer.config import config_from_arguments
    from .trainer.loop import Distributed
    from .trainer.train import train

    config = config_from_arguments(args)
    result = train(config)
    processes = Distributed()
    if not processes.is_main:
        return result.interruption.exit_status if result.interruption else 0
    if result.interruption:
        print(f"\n{interruption_message(result, config.steps)}", file=sys.stderr)
        return result.interruption.exit_status
    if result.stopped_early:
        print(f"sara-train train: stopped early: {result.stopped_early}", file=sys.stderr)
    if result.losses:
        last = result.losses[-1]
        on = f" on {processes.world} processes" if processes.world > 1 else ""
        print(f"trained {last.step} steps{on} ({result.num_trainable:,} trainable entries) in {last.seconds:.0f} s; "
              f"final loss {last.loss:.4f}; delta: {result.delta_path}")
    return 0


def interruption_message(result, total_steps: int) -> str:
    """One line: which signal stopped the run, while doing what, and what is on disk."""
    stop = f"sara-train train: {result.interruption.signal_name} while {result.stopped_while}"
    if result.delta_path is None:
        return f"{stop}; nothing was saved (no training step had finished)"
    steps = len(result.losses)
    if steps >= total_steps or result.stopped_while == "rendering the final samples":
        return f"{stop}; training had finished and is saved: {result.delta_path}"
    return (f"{stop}; saved step {steps} of {total_steps}: {result.delta_path} and the resume state. "
            f"Continue with the same command plus --resume")


def main(argv: list[str] | None = None) -> int:
    from . import cli_tools
    from .trainer.interrupts import Interrupted, StopSignals

    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "merge": cli_tools.merge_command, "inspect": cli_tools.inspect_command,
                "analyze": cli_tools.analyze_command}
    with StopSignals():
        try:
            return commands[args.command](args) or 0
        except SaRAError as error:
            print(f"sara-train {args.command}: error: {error}", file=sys.stderr)
            return 2
        except Interrupted as stop:  # merge / analyze: their writes are atomic, so nothing partial is left
            print(f"\nsara-train {args.command}: {stop.signal_name}: stopped; no output file was written",
                  file=sys.stderr)
            return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
