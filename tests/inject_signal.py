"""Run the ``sara-train`` CLI in a real process that signals itself at a chosen point.

    python tests/inject_signal.py MODULE:ATTRIBUTE CALL SIGNAL [MODULE:ATTRIBUTE CALL SIGNAL ...] -- ARGS

wraps ``MODULE.ATTRIBUTE`` (a dotted attribute path, e.g. ``diffusers.UNet2DConditionModel.forward``)
so that its CALL-th call first raises SIGNAL (``SIGINT`` or ``SIGTERM``) in the process, then runs
``sara_train.cli.main(ARGS)`` and exits with its status. Under ``torchrun``, set ``INJECT_RANK``
to signal only the process of that rank.
"""

import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_cli import signal_on_call


def install(target: str, call: int, signal_name: str) -> None:
    module_name, _, attribute_path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, signal_on_call(getattr(owner, name), {call: signal.Signals[signal_name]}))


if __name__ == "__main__":
    split = sys.argv.index("--")
    triples = sys.argv[1:split]
    if os.environ.get("INJECT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        for start in range(0, len(triples), 3):
            install(triples[start], int(triples[start + 1]), triples[start + 2])
    from sara_train.cli import main

    sys.exit(main(sys.argv[split + 1 :]))
