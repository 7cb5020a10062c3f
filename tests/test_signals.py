"""SIGINT / SIGTERM at every phase of `sara-train train` (and of the demo), injected at chosen
points, never raced against a timer: each run ends with the one-line message, exit status 130 /
143, the last completed step saved (or nothing, before the first step), no partial or temporary
file, and a resume that ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from train_cli import assert_identical, read_delta, signal_on_call, stray_signals_fail_the_test, train_args

from sara_train.cli import main
from sara_train.trainer.logs import read_loss_log

SIGINT, SIGTERM = signal.SIGINT, signal.SIGTERM
RUN_OPTIONS = (
    "--save-every",
    "2",
    "--sample-prompts",
    "a red disc",
    "--sample-every",
    "2",
    "--sample-steps",
    "2",
    "--progressive-fraction",
    "0.5",
)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with stray_signals_fail_the_test():
        status = main(args)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tiny_base: Path, image_folder: Path, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted-and-resumed one must reproduce."""
    out = tmp_path_factory.mktemp("signals") / "reference"
    assert main(train_args(tiny_base, image_folder, out, *RUN_OPTIONS)) == 0
    return out


# (phase, attribute to wrap, {call number: signal}, exit status, message, step saved (None: nothing))
PHASES = [
    (
        "loading the base",
        "sara_train.trainer.train.load_base",
        {1: SIGINT},
        130,
        "SIGINT while loading the base model; nothing was saved",
        None,
    ),
    (
        "encoding the cache",
        "sara_train.trainer.cache.save_file",
        {2: SIGTERM},
        143,
        "SIGTERM while encoding the training images; nothing was saved",
        None,
    ),
    (
        "the first step",
        "diffusers.UNet2DConditionModel.forward",
        {1: SIGINT},
        130,
        "SIGINT while training step 1; nothing was saved",
        None,
    ),
    (
        "a step",
        "diffusers.UNet2DConditionModel.forward",
        {6: SIGTERM},
        143,  # calls 3-4 render step 2's samples
        "SIGTERM while training step 4; saved step 3 of 6",
        3,
    ),
    (
        "the delta write",
        "sara_train.engine.delta.save_file",
        {1: SIGINT},
        130,
        "SIGINT while saving step 2; saved step 2 of 6",
        2,
    ),
    (
        "the state write",
        "sara_train.trainer.state_file.save_file",
        {1: SIGTERM},
        143,
        "SIGTERM while saving step 2; saved step 2 of 6",
        2,
    ),
    (
        "the log plot",
        "sara_train.plots.loss.smoothed",
        {1: SIGINT},
        130,
        "SIGINT while saving step 2; saved step 2 of 6",
        2,
    ),
    (
        "sample rendering",
        "diffusers.StableDiffusionPipeline.__call__",
        {1: SIGINT},
        130,
        "SIGINT while rendering the samples of step 2; saved step 2 of 6",
        2,
    ),
    (
        "a second Ctrl-C in the final save",
        "sara_train.trainer.state_file.save_file",
        {2: SIGINT},
        130,
        "SIGINT while training step 4; saved step 3 of 6",
        3,
    ),
    (
        "the final samples",
        "diffusers.StableDiffusionPipeline.__call__",
        {3: SIGTERM},
        143,
        "SIGTERM while rendering the final samples; training had finished and is saved",
        6,
    ),
]


def wrap(monkeypatch, target: str, calls: dict[int, int]) -> None:
    import importlib

    module_name, _, attribute = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a class attribute: module.Class.method
        module_name, _, class_name = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
    monkeypatch.setattr(owner, attribute, signal_on_call(getattr(owner, attribute), calls))


@pytest.mark.parametrize("phase, target, calls, status, message, saved_step", PHASES, ids=[p[0] for p in PHASES])
def test_a_signal_at_any_phase_ends_cleanly_and_resumes_exactly(
    phase,
    target,
    calls,
    status,
    message,
    saved_step,
    reference: Path,
    tiny_base: Path,
    image_folder: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    out = tmp_path / "run"
    args = train_args(tiny_base, image_folder, out, *RUN_OPTIONS)
    if phase == "a second Ctrl-C in the final save":  # the first Ctrl-C lands in step 4, the second in its save
        wrap(monkeypatch, "diffusers.UNet2DConditionModel.forward", {6: SIGINT})
    wrap(monkeypatch, target, calls)
    exit_status, stderr = run_cli(args, capsys)

    assert exit_status == status, stderr
    assert message in stderr and "Traceback" not in stderr
    if phase == "a second Ctrl-C in the final save":
        assert "SIGINT again: already stopping; the save in progress completes first" in stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers
    deltas = sorted(out.glob("sara_delta*.safetensors"))
    if saved_step is None:
        assert deltas == [] and not (out / "state").exists()
        return
    newest = (
        out / "sara_delta.safetensors" if saved_step == 6 else out / f"sara_delta_step{saved_step:06d}.safetensors"
    )
    assert read_delta(newest).metadata["steps"] == str(saved_step)
    assert [row.step for row in read_loss_log(out / "loss.csv")] == list(range(1, saved_step + 1))

    monkeypatch.undo()
    assert run_cli([*args, "--resume"], capsys)[0] == 0
    assert_identical(read_delta(out / "sara_delta.safetensors"), read_delta(reference / "sara_delta.safetensors"))
    assert [row.loss for row in read_loss_log(out / "loss.csv")] == [
        row.loss for row in read_loss_log(reference / "loss.csv")
    ]


def test_the_demo_stops_saves_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    from sara_train.demo.run import main as demo_main

    out = tmp_path / "demo"
    wrap(monkeypatch, "sara_train.trainer.loop.micro_batch_loss", {2: SIGTERM})
    with stray_signals_fail_the_test():
        status = demo_main(["--out", str(out), "--steps", "3"])
    stderr = capsys.readouterr().err
    assert status == 143 and "demo: SIGTERM while training step 2; saved step 1" in stderr, stderr
    assert read_delta(out / "sara_delta_step000001.safetensors").metadata["steps"] == "1"
    assert not (out / "before_after.png").exists()
    monkeypatch.undo()
    with stray_signals_fail_the_test():
        assert demo_main(["--out", str(out), "--steps", "3", "--resume"]) == 0
    assert read_delta(out / "sara_delta.safetensors").metadata["steps"] == "3"
    assert (out / "before_after.png").exists()
