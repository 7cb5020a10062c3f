"""``sara-train train``: the trainer run from the command line, with one-line reports."""

from __future__ import annotations

import argparse
import sys


def run_train(args: argparse.Namespace) -> int:
    from ..trainer.config import config_from_arguments
    from ..trainer.loop import Distributed
    from ..trainer.train import train

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
        print(
            f"trained {last.step} steps{on} ({result.num_trainable:,} trainable entries) in {last.seconds:.0f} s; "
            f"final loss {last.loss:.4f}; delta: {result.delta_path}"
        )
    return 0


def interruption_message(result, total_steps: int) -> str:
    """One line: which signal stopped the run, while doing what, and what is on disk."""
    stop = f"sara-train train: {result.interruption.signal_name} while {result.stopped_while}"
    if result.delta_path is None:
        return f"{stop}; nothing was saved (no training step had finished)"
    steps = len(result.losses)
    if steps >= total_steps or result.stopped_while == "rendering the final samples":
        return f"{stop}; training had finished and is saved: {result.delta_path}"
    return (
        f"{stop}; saved step {steps} of {total_steps}: {result.delta_path} and the resume state. "
        f"Continue with the same command plus --resume"
    )
