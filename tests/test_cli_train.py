"""`sara-train train` end to end on a real tiny Stable Diffusion pipeline and a generated image folder:
it trains, writes the delta (LDM keys, loadable by ComfyUI's naming), samples, merges, resumes exactly,
runs as 2 DDP processes, and explains bad input."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_sd import write_tiny_sd_pipeline
from train_cli import REPO, assert_identical, read_delta, sara_train_cli, train_args, write_image_folder

from sara_train.trainer.logs import ValidationRow, read_loss_log, read_rows

TRAINING_FEATURES = ("--validation-split", "0.25", "--validation-every", "4", "--ema-decay", "0.9")
"""Options of the full run (and its interrupted twin) beyond the basics."""


@pytest.fixture(scope="module")
def trained(tiny_base: Path, image_folder: Path, tmp_path_factory) -> Path:
    """One full CLI run with samples and periodic saves: its output folder."""
    out = tmp_path_factory.mktemp("runs") / "full"
    result = sara_train_cli(
        *train_args(
            tiny_base,
            image_folder,
            out,
            "--save-every",
            "2",
            "--sample-prompts",
            "a red disc",
            "--sample-steps",
            "2",
            "--progressive-fraction",
            "0.5",
            *TRAINING_FEATURES,
        )
    )
    assert result.returncode == 0, result.stderr
    assert "trained 6 steps" in result.stdout and str(out / "sara_delta.safetensors") in result.stdout
    return out


def test_train_writes_a_complete_run(trained: Path) -> None:
    delta = read_delta(trained / "sara_delta.safetensors")
    assert all(
        key.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."))
        for key in delta.layers
    ), "deltas use the original SD (ComfyUI) names"
    assert delta.metadata["base_kind"] == "sd1" and delta.metadata["steps"] == "6"
    assert delta.metadata["images"] == "3" and delta.metadata["validation_images"] == "1"  # 1 of 4 held out
    validation = read_rows(trained / "validation.csv", ValidationRow)
    assert [row.step for row in validation] == [4, 6] and all(0 < row.loss < 10 for row in validation)
    ema = read_delta(trained / "sara_delta_ema.safetensors")
    assert ema.layers.keys() == delta.layers.keys() and ema.metadata["ema_updates"] == "6"
    assert (trained / "sara_delta_ema_step000004.safetensors").exists()
    assert delta.layers[next(iter(delta.layers))].values.dtype == torch.float16
    assert [row.step for row in read_loss_log(trained / "loss.csv")] == [1, 2, 3, 4, 5, 6]
    assert (trained / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in trained.glob("sara_delta_step*")) == [
        "sara_delta_step000002.safetensors",
        "sara_delta_step000004.safetensors",
    ]
    assert Image.open(trained / "samples" / "step000006.png").size == (32, 32)


def test_resume_after_ctrl_c_is_bit_identical(
    trained: Path, tiny_base: Path, image_folder: Path, tmp_path: Path
) -> None:
    """A real process gets SIGINT in the UNet's forward of step 4 (after its step-2 save): it saves
    step 3, exits 130; resuming it ends bit-identical to the uninterrupted run."""
    out = tmp_path / "interrupted"
    args = train_args(
        tiny_base,
        image_folder,
        out,
        "--save-every",
        "2",
        "--sample-prompts",
        "a red disc",
        "--sample-steps",
        "2",
        "--progressive-fraction",
        "0.5",
        *TRAINING_FEATURES,
        "--cache-dir",
        str(trained.parent / "cache"),
    )
    injected = [
        sys.executable,
        str(REPO / "tests" / "inject_signal.py"),
        "diffusers:UNet2DConditionModel.forward",
        "4",
        "SIGINT",
        "--",
        *args,
    ]
    interrupted = subprocess.run(
        injected, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert "SIGINT while training step 4; saved step 3 of 6" in interrupted.stderr and "--resume" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert read_delta(out / "sara_delta_step000003.safetensors").metadata["steps"] == "3"

    refused = sara_train_cli(*args)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = sara_train_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(read_delta(out / "sara_delta.safetensors"), read_delta(trained / "sara_delta.safetensors"))
    assert read_loss_log(out / "loss.csv") and [r.loss for r in read_loss_log(out / "loss.csv")] == [
        r.loss for r in read_loss_log(trained / "loss.csv")
    ]
    ema, reference_ema = out / "sara_delta_ema.safetensors", trained / "sara_delta_ema.safetensors"
    assert_identical(read_delta(ema), read_delta(reference_ema))
    assert read_rows(out / "validation.csv", ValidationRow) == read_rows(trained / "validation.csv", ValidationRow)


def test_merge_into_the_single_file_it_was_trained_from(tiny_base: Path, image_folder: Path, tmp_path: Path) -> None:
    """Train from a single-file checkpoint, merge the delta into that file, load the result: the UNet
    equals the trained one."""
    from single_file import write_single_file_checkpoint

    from sara_train.families.sd_unet import delta_to_diffusers_keys
    from sara_train.trainer.base_model import load_base

    checkpoint = write_single_file_checkpoint(tiny_base, tmp_path / "tiny.safetensors")
    out = tmp_path / "run"
    result = sara_train_cli(
        *train_args(checkpoint, image_folder, out, "--base-config", str(tiny_base), "--delta-dtype", "fp32")
    )
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "merged.safetensors"
    result = sara_train_cli(
        "merge", "--base", str(checkpoint), "--delta", f"{out / 'sara_delta.safetensors'}:1.0", "--out", str(merged)
    )
    assert result.returncode == 0, result.stderr
    base_unet = load_base(checkpoint, config_dir=tiny_base).unet
    merged_unet = load_base(merged, config_dir=tiny_base).unet
    delta = delta_to_diffusers_keys(read_delta(out / "sara_delta.safetensors"), dict(base_unet.config))
    delta.apply_to(base_unet)
    for name, weight in merged_unet.state_dict().items():
        assert torch.equal(weight, base_unet.state_dict()[name]), name
    changed = list(delta.layers)
    assert changed and not torch.equal(
        merged_unet.state_dict()[changed[0]], load_base(checkpoint, config_dir=tiny_base).unet.state_dict()[changed[0]]
    )


def test_two_processes_equal_one_with_the_whole_batch(tiny_base: Path, image_folder: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2` (what `accelerate launch` runs) with batch 1 each = one process, batch 2.
    A SIGTERM that reaches only the second process in step 3 stops both after step 2 (they agree
    once per step), the first saves it, and resuming ends bit-identical to the uninterrupted run."""
    single = sara_train_cli(
        *train_args(tiny_base, image_folder, tmp_path / "single", "--steps", "3", "--delta-dtype", "fp32")
    )
    assert single.returncode == 0, single.stderr

    def torchrun(out: str, *extra: str, inject: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        args = train_args(
            tiny_base,
            image_folder,
            tmp_path / out,
            "--steps",
            "3",
            "--batch-size",
            "1",
            "--delta-dtype",
            "fp32",
            *extra,
        )
        program = [str(REPO / "tests" / "inject_signal.py"), *inject, "--"] if inject else ["-m", "sara_train"]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            *program,
            *args,
        ]
        return subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "INJECT_RANK": "1"},
        )

    ddp = torchrun("ddp")
    assert ddp.returncode == 0, ddp.stderr
    got, want = (
        read_delta(tmp_path / "ddp" / "sara_delta.safetensors"),
        read_delta(tmp_path / "single" / "sara_delta.safetensors"),
    )
    assert got.layers.keys() == want.layers.keys()
    for name, layer in want.layers.items():
        assert torch.equal(got.layers[name].flat_indices, layer.flat_indices)
        torch.testing.assert_close(got.layers[name].values, layer.values, rtol=0, atol=1e-4)  # one Adam step is ~1e-3
    losses = [row.loss for row in read_loss_log(tmp_path / "ddp" / "loss.csv")]
    assert losses == pytest.approx([row.loss for row in read_loss_log(tmp_path / "single" / "loss.csv")], rel=1e-4)

    stopped = torchrun("stopped", inject=("diffusers:UNet2DConditionModel.forward", "3", "SIGTERM"))
    assert stopped.returncode != 0 and "SIGTERM while training step 3; saved step 2 of 3" in stopped.stderr, (
        stopped.stderr
    )
    assert read_delta(tmp_path / "stopped" / "sara_delta_step000002.safetensors").metadata["steps"] == "2"
    resumed = torchrun("stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(read_delta(tmp_path / "stopped" / "sara_delta.safetensors"), got)
    assert [row.loss for row in read_loss_log(tmp_path / "stopped" / "loss.csv")] == losses


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def corrupt_image(folder: Path) -> str:
    (folder / "disc_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return "disc_1.png"


def missing_caption(folder: Path) -> str:
    (folder / "disc_2.txt").unlink()
    return "disc_2.png"


def empty_folder(folder: Path) -> str:
    for path in folder.iterdir():
        path.unlink()
    return "is empty"


@pytest.mark.parametrize("break_data", [corrupt_image, missing_caption, empty_folder])
def test_bad_data_is_named_and_nothing_is_written(tiny_base: Path, tmp_path: Path, break_data) -> None:
    data = write_image_folder(tmp_path / "data")
    expected = break_data(data)
    out = tmp_path / "run"
    result = sara_train_cli(*train_args(tiny_base, data, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "sara-train train: error:" in result.stderr
    assert expected in result.stderr.split("sara-train train: error:")[1]
    assert not out.exists() or not any(out.rglob("*.safetensors"))


@pytest.mark.parametrize(
    "make_base, expected",
    [
        (lambda tmp: tmp / "nothing-here", "no such file or folder"),
        (lambda tmp: (tmp / "model.ckpt").write_bytes(b"PK\x03\x04pickle") and tmp / "model.ckpt", "pickle"),
        (
            lambda tmp: (
                (tmp / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
                and tmp / "broken.safetensors"
            ),
            "broken.safetensors",
        ),
        (lambda tmp: (tmp / "folder").mkdir() or tmp / "folder", "model_index.json"),
    ],
)
def test_unloadable_base_is_explained(image_folder: Path, tmp_path: Path, make_base, expected: str) -> None:
    result = sara_train_cli(*train_args(make_base(tmp_path), image_folder, tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr


def test_out_of_disk_while_saving_leaves_no_corrupt_file(tiny_base: Path, image_folder: Path, tmp_path: Path) -> None:
    """Files above 100 kB cannot be written (RLIMIT_FSIZE, as on a full disk): the delta save fails
    with a message naming it, and neither a partial delta nor a temp file is left."""

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "sara_train",
        *train_args(tiny_base, image_folder, out, "--steps", "1", "--cache-dir", str(tmp_path / "cache")),
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    assert f"could not write {out / 'sara_delta.safetensors'}" in result.stderr and "File too large" in result.stderr
    leftovers = [p.name for p in out.rglob("*") if p.suffix in (".tmp", ".safetensors")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind, base_kind", [("sd2", "sd2"), ("sdxl", "sdxl")])
def test_sd2_and_sdxl_bases_train(kind: str, base_kind: str, image_folder: Path, tmp_path: Path) -> None:
    """v-prediction (SD2) and SDXL's pooled text embeddings + size/crop conditioning go through the
    same command, also with min-SNR weighting and caption dropout (the empty caption encoded with
    SDXL's pooled embedding); the delta gets original SD names and the loss log is finite."""
    base = write_tiny_sd_pipeline(tmp_path / kind, kind)
    out = tmp_path / "run"
    features = ("--snr-gamma", "5", "--caption-dropout", "0.5")
    result = sara_train_cli(
        *train_args(
            base,
            image_folder,
            out,
            "--steps",
            "2",
            "--crop",
            "random",
            "--random-crop-variants",
            "2",
            "--flip",
            *features,
        )
    )
    assert result.returncode == 0, result.stderr
    delta = read_delta(out / "sara_delta.safetensors")
    assert (
        delta.metadata["base_kind"] == base_kind and delta.metadata["examples"] == "16"
    )  # 4 images x 2 crops x 2 flips
    assert any(key.startswith("input_blocks.") for key in delta.layers)
    if kind == "sdxl":
        assert any(key.startswith("label_emb.") for key in delta.layers)  # the size/crop/pooled embedding trains too
    assert all(0 < row.loss < 10 for row in read_loss_log(out / "loss.csv"))
