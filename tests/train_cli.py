"""Helpers for the ``sara-train train`` tests: a generated image folder, the CLI arguments of a tiny
run, the CLI as a real process or in this process, and signals injected at chosen points."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sara_train import SparseDelta

REPO = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "green", "orange"]


def write_image_folder(folder: Path, count: int = 4, size: int = 40) -> Path:
    """``count`` PNGs of coloured discs on grey, each with a kohya-style caption file."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size + 8 * (i % 2)), "gray")
        ImageDraw.Draw(image).ellipse([4 + i, 4, size - 6, size - 4 - i], fill=COLORS[i % len(COLORS)])
        image.save(folder / f"disc_{i}.png")
        (folder / f"disc_{i}.txt").write_text(f"a {COLORS[i % len(COLORS)]} disc")
    return folder


def train_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A 6-step run at 32 px of a tiny pipeline (budget 0.1 unless ``extra`` has a --threshold),
    caching beside ``out``; ``extra`` flags override."""
    selection = [] if "--threshold" in extra else ["--budget", "0.1"]
    return [
        "train",
        "--base",
        str(base),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--resolution",
        "32",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        *selection,
        "--cache-dir",
        str(out.parent / "cache"),
        "--device",
        "cpu",
        *extra,
    ]


def sara_train_cli(
    *args: str, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m sara_train ARGS`` as a real process."""
    command = (launcher or [sys.executable]) + ["-m", "sara_train", *args]
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def read_delta(path: Path) -> SparseDelta:
    return SparseDelta.load(path)


def assert_identical(got: SparseDelta, want: SparseDelta) -> None:
    assert got.layers.keys() == want.layers.keys()
    for name, layer in want.layers.items():
        assert torch.equal(got.layers[name].flat_indices, layer.flat_indices), name
        assert torch.equal(got.layers[name].values, layer.values), name


def signal_on_call(function: Callable, calls: dict[int, int]) -> Callable:
    """``function`` wrapped to raise ``calls[n]`` (a signal number) in this process at its ``n``-th
    call, before running it. ``signal.raise_signal`` runs the Python handler before it returns,
    so the signal lands exactly there, deterministically."""
    count = 0

    def wrapper(*args, **kwargs):
        nonlocal count
        count += 1
        if count in calls:
            signal.raise_signal(calls[count])
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def stray_signals_fail_the_test() -> Iterator[None]:
    """While inside, SIGINT/SIGTERM that nobody else handles raise AssertionError instead of
    ending the test session."""

    def escaped(number, frame):
        raise AssertionError(f"{signal.Signals(number).name} reached the test: the code under test did not handle it")

    previous = {number: signal.signal(number, escaped) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
