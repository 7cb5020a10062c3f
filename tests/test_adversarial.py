"""Every defect the adversarial pass found, reproduced by its attack. Each test failed on the code
before the fix. (The signal attacks are in ``test_signals.py``.)

Attacks and their tests:

- A failed SaRA Train (NaN learning rate, an error after injection) poisons ComfyUI's cached model:
  ``test_failed_optimizer_or_injection_leaves_the_model_as_it_was``,
  ``test_a_failed_train_leaves_comfyuis_shared_model_clean``.
- ``merge --out`` = ``--delta``, an existing or special ``--out``, the merge node onto its own input:
  ``test_merge_never_destroys_an_input_or_an_existing_file``, ``test_merge_node_never_writes_over_its_input``.
- NaN / inf strength in ``apply_to``, SaRA Load / Apply, ``merge --delta f:nan``:
  ``test_non_finite_strengths_are_refused``, ``test_comfyui_refuses_non_finite_strengths``.
- A progressive step that freezes every entry: ``test_a_reselection_that_freezes_everything_stops_and_saves``,
  ``test_comfyui_train_stops_when_everything_froze``.
- An unwritable ``--output-dir`` / ``--out`` found after the work: ``test_unwritable_outputs_fail_before_any_work``.
- Key resolution depends on the hash seed: ``test_key_resolution_is_the_same_under_every_hash_seed``,
  ``test_ambiguous_keys_are_refused``.
- Merging a delta into a checkpoint that already holds it: ``test_merging_the_same_delta_twice_is_refused``.
- A 1 x 200,000 PNG upscaled before cropping: ``test_a_tiny_extreme_image_costs_little_memory``.
- ``[train]`` dropping top-level keys, a negative ``--rank-layers-per-step``, resuming on replaced data, the
  same folder spelled otherwise: ``test_toml_top_level_and_train_table_both_count``,
  ``test_silently_ignored_options_are_refused``, ``test_resume_refuses_changed_data_but_not_another_spelling``.
- Tracebacks instead of one-line errors: ``test_malformed_delta_metadata_is_a_format_error``,
  ``test_checkpoint_header_that_lies_about_sizes``, ``test_bad_train_options_are_one_line_errors_before_loading``,
  ``test_train_problems_found_later_are_one_line_errors``.
- ``inspect --json`` NaN and terminal escapes, bf16+fp16 stacking, ``--out`` inside ``--base`` and link loops,
  the data folder as ``--output-dir``: ``test_inspect_output_is_valid_json_and_inert_text``,
  ``test_stacking_mixed_half_dtypes_keeps_fp32``, ``test_folder_merge_refuses_out_inside_base_and_link_loops``,
  ``test_data_folder_as_output_dir_is_refused``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from train_cli import REPO, read_delta, stray_signals_fail_the_test, train_args

import sara_train
from sara_train import DeltaFormatError, DeltaMismatchError, SaRAError
from sara_train.cli import main
from tools.comfyui_server import execution_error


def cli(*args, capsys=None) -> tuple[int, str]:
    """``sara-train ARGS`` in this process: ``(exit status, stderr)`` (stderr needs ``capsys``)."""
    with stray_signals_fail_the_test():
        status = main([str(arg) for arg in args])
    return status, capsys.readouterr().err if capsys is not None else ""


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(param.requires_grad for param in model.parameters())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


# ------------------------------------------------------------------------------- failed training
def test_failed_optimizer_or_injection_leaves_the_model_as_it_was(tiny_net: TinyNet) -> None:
    before = state_of(tiny_net)
    with pytest.raises(SaRAError, match="lr must be a finite number"):
        sara_train.SaRAAdamW(tiny_net, lr=float("nan"), budget=0.2)
    assert_untouched(tiny_net, before)
    with pytest.raises(ValueError, match="beta"):  # torch rejects it after SaRA was injected
        sara_train.SaRAAdamW(tiny_net, lr=1e-3, budget=0.2, betas=(2.0, 0.9))
    assert_untouched(tiny_net, before)
    tiny_net.head.weight = nn.Parameter(torch.randn(16, 4).t())  # not contiguous: injection fails part way
    before = state_of(tiny_net)
    with pytest.raises(SaRAError, match="contiguous"):
        sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.5))
    assert_untouched(tiny_net, before)
    tiny_net.head.weight = nn.Parameter(tiny_net.head.weight.detach().contiguous())
    sara_train.SaRAAdamW(tiny_net, lr=1e-3, budget=0.2).handle.remove(merge=False)  # injects cleanly again


def test_a_failed_train_leaves_comfyuis_shared_model_clean(comfy) -> None:
    """A NaN learning rate (which ComfyUI's range check lets through) and a forward that fails after
    SaRA was injected (latents of the wrong channel count) are node errors; afterwards the cached
    model trains, loads deltas and saves exactly as before."""
    from tools.comfyui_graphs import train_graph

    server, base = comfy
    entry = server.run(train_graph(steps=2, learning_rate=float("nan")))
    assert entry["status"]["status_str"] == "error"
    assert "learning_rate must be a finite number" in execution_error(entry)

    save_file({"latent_tensor": torch.randn(2, 3, 8, 8)}, str(server.base / "input" / "three_channels.latent"))
    graph = train_graph(steps=2)
    graph["bad"] = {"class_type": "LoadLatent", "inputs": {"latent": "three_channels.latent"}}
    graph["train"]["inputs"]["latents"] = ["bad", 0]
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error" and "channels" in execution_error(entry), execution_error(entry)

    graph = train_graph(steps=2)
    graph["save"] = {
        "class_type": "ModelSave",
        "inputs": {"model": ["ckpt", 0], "filename_prefix": "diffusion_models/after_failures"},
    }
    graph["load"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["ckpt", 0], "delta_name": "a.safetensors", "strength": 1.0},
    }
    graph["sampled"] = {
        "class_type": "ModelSave",
        "inputs": {"model": ["load", 0], "filename_prefix": "diffusion_models/after_failures_a"},
    }
    server.run_ok(graph)  # SaRA Train is not "already parametrized", SaRA Load finds its keys
    (saved,) = (server.base / "output" / "diffusion_models").glob("after_failures_0*.safetensors")
    saved = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(saved)).items()}
    assert set(saved) == set(base), "ModelSave lost weights or gained SaRA buffers"
    assert all(torch.equal(saved[key], base[key]) for key in base)


# ------------------------------------------------------------------------------- merge outputs
def test_merge_never_destroys_an_input_or_an_existing_file(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    checkpoint = {"model.diffusion_model." + k: v for k, v in TinyNet().state_dict().items()}
    base = tmp_path / "base.safetensors"
    save_file(checkpoint, str(base))
    torch.manual_seed(0)
    handle = sara_train.inject(TinyNet(), sara_train.SaRAConfig(budget=0.2))
    delta_file = handle.delta().save(tmp_path / "delta.safetensors")
    delta_bytes = delta_file.read_bytes()

    status, stderr = cli("merge", "--base", base, "--delta", delta_file, "--out", delta_file, capsys=capsys)
    assert status == 2 and "is the input file" in stderr and delta_file.read_bytes() == delta_bytes
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    status, stderr = cli("merge", "--base", base, "--delta", delta_file, "--out", existing, capsys=capsys)
    assert status == 2 and "already exists" in stderr and existing.read_bytes() == b"keep me"
    assert cli("merge", "--base", base, "--delta", delta_file, "--out", existing, "--overwrite")[0] == 0
    assert set(load_file(str(existing))) == set(checkpoint)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status, stderr = cli("merge", "--base", base, "--delta", delta_file, "--out", fifo, "--overwrite", capsys=capsys)
    assert status == 2 and "not a regular file" in stderr and fifo.is_fifo()
    link = tmp_path / "link.safetensors"
    link.symlink_to(base)
    status, stderr = cli("merge", "--base", base, "--delta", delta_file, "--out", link, "--overwrite", capsys=capsys)
    assert status == 2 and "is the input file" in stderr


def test_merge_node_never_writes_over_its_input(comfy) -> None:
    """The input's own name as the prefix (with overwrite on, it used to rewrite the input): the
    node now numbers every output, so the input is never a candidate."""
    server, _ = comfy
    checkpoint = server.base / "models" / "checkpoints" / "tiny_ckpt.safetensors"
    before = checkpoint.read_bytes()
    server.run_ok(
        {
            "merge": {
                "class_type": "SaRAMergeCheckpoint",
                "inputs": {
                    "ckpt_name": "tiny_ckpt.safetensors",
                    "delta_1": "a.safetensors",
                    "strength_1": 1.0,
                    "delta_2": "[None]",
                    "strength_2": 1.0,
                    "delta_3": "[None]",
                    "strength_3": 1.0,
                    "filename_prefix": "tiny_ckpt",
                },
            }
        }
    )
    assert checkpoint.read_bytes() == before
    assert (checkpoint.parent / "tiny_ckpt_00001_.safetensors").exists()


# ------------------------------------------------------------------------------- strengths
@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_strengths_are_refused(tiny_net: TinyNet, strength: float, tmp_path: Path, capsys) -> None:
    handle = sara_train.inject(copy.deepcopy(tiny_net), sara_train.SaRAConfig(budget=0.2))
    delta = handle.delta()
    before = state_of(tiny_net)
    with pytest.raises(SaRAError, match="strength must be a finite number"):
        delta.apply_to(tiny_net, strength=strength)
    assert_untouched(tiny_net, before)
    with pytest.raises(SaRAError, match="finite"):
        sara_train.SparseDelta.stack([delta, delta], [1.0, strength])
    path = delta.save(tmp_path / "d.safetensors")
    status, stderr = cli(
        "merge", "--base", path, "--delta", f"{path}:{strength}", "--out", tmp_path / "o.safetensors", capsys=capsys
    )
    assert status == 2 and "must be a finite number" in stderr


def test_comfyui_refuses_non_finite_strengths(comfy) -> None:
    from tools.comfyui_graphs import train_graph

    server, _ = comfy
    load = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "default"}},
        "sara": {
            "class_type": "SaRALoader",
            "inputs": {"model": ["unet", 0], "delta_name": "a.safetensors", "strength": float("nan")},
        },
        "save": {
            "class_type": "ModelSave",
            "inputs": {"model": ["sara", 0], "filename_prefix": "diffusion_models/nan"},
        },
    }
    entry = server.run(load)
    assert entry["status"]["status_str"] == "error" and "strength must be a finite number" in execution_error(entry)
    graph = train_graph(steps=1)
    graph["apply"] = {
        "class_type": "SaRAApply",
        "inputs": {"model": ["ckpt", 0], "delta": ["train", 1], "strength": float("nan")},
    }  # inf fails ComfyUI's range check
    graph["save"] = {
        "class_type": "ModelSave",
        "inputs": {"model": ["apply", 0], "filename_prefix": "diffusion_models/nan2"},
    }
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error" and "strength must be a finite number" in execution_error(entry)
    assert not list((server.base / "output" / "diffusion_models").glob("nan*"))


# ------------------------------------------------------------------------------- frozen re-selection
def test_a_reselection_that_freezes_everything_stops_and_saves(
    tiny_base: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    status, stderr = cli(
        *train_args(
            tiny_base,
            image_folder,
            out,
            "--threshold",
            "1e-5",
            "--learning-rate",
            "1",
            "--steps",
            "4",
            "--progressive-fraction",
            "0.5",
            "--rank-weight",
            "0",
        ),
        capsys=capsys,
    )
    assert status == 0, stderr
    assert "stopped early: the progressive step after step 2 left no entry trainable" in stderr
    delta = read_delta(out / "sara_delta.safetensors")
    assert delta.metadata["steps"] == "2" and delta.num_entries > 0


def test_comfyui_train_stops_when_everything_froze(comfy) -> None:
    from tools.comfyui_graphs import train_graph

    server, _ = comfy
    entry = server.run_ok(train_graph(steps=4, learning_rate=1.0, threshold=1e-6, rank_loss_weight=0.0))
    assert entry["outputs"]["train"]["sara_status"][0].startswith("stopped early: 2/4 steps")
    assert len(entry["outputs"]["train"]["sara_loss"]) == 2


# ------------------------------------------------------------------------------- outputs checked first
def test_unwritable_outputs_fail_before_any_work(tmp_path: Path, image_folder: Path, capsys) -> None:
    """The base named here does not exist: the output error coming first shows nothing was loaded."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    missing_base = tmp_path / "no-such-base"
    for output_dir in (blocker, blocker / "below"):
        status, stderr = cli(*train_args(missing_base, image_folder, output_dir), capsys=capsys)
        assert status == 2 and f"--output-dir {output_dir} cannot be written to" in stderr, stderr
    status, stderr = cli("analyze", "--base", missing_base, "--out", blocker / "analysis", capsys=capsys)
    assert status == 2 and "--out" in stderr and "cannot be written to" in stderr, stderr
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_file(TinyNet().state_dict(), str(base))
    torch.manual_seed(0)
    delta = sara_train.inject(TinyNet(), sara_train.SaRAConfig(budget=0.2)).delta().save(tmp_path / "d.safetensors")
    status, stderr = cli("merge", "--base", base, "--delta", delta, "--out", blocker / "m.safetensors", capsys=capsys)
    assert status == 2 and f"could not write {blocker / 'm.safetensors'}" in stderr, stderr
    assert "Traceback" not in stderr


# ------------------------------------------------------------------------------- key resolution
AMBIGUOUS = """
import sys, torch
sys.path.insert(0, {repo!r})
from sara_train.engine.keys import resolve_keys
targets = [f"blocks.{{i}}.attn.{{p}}.weight" for i in range(6) for p in ("to_q", "to_k")]
try:
    print(resolve_keys(["attn.to_q.weight", "attn.to_k.weight"], targets, "the model"))
except Exception as error:
    print(type(error).__name__, error)
targets = ["model.blocks.3.attn.to_q.weight", "model.blocks.4.attn.to_q.weight"]
print(resolve_keys(["3.attn.to_q.weight"], targets, "m"))
"""


def test_key_resolution_is_the_same_under_every_hash_seed() -> None:
    outputs = set()
    for seed in range(6):
        result = subprocess.run(
            [sys.executable, "-c", AMBIGUOUS.format(repo=str(REPO))],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1, outputs
    (output,) = outputs
    assert output.startswith("DeltaMismatchError") and "fit the model in 6 places" in output
    assert "{'3.attn.to_q.weight': 'model.blocks.3.attn.to_q.weight'}" in output


def test_ambiguous_keys_are_refused() -> None:
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 4)), "b": nn.Sequential(nn.Linear(4, 4))})
    part = nn.Sequential(nn.Linear(4, 4))
    part.load_state_dict(model["a"].state_dict())
    delta = sara_train.inject(part, sara_train.SaRAConfig(budget=0.5)).delta()
    before = state_of(model)
    with pytest.raises(DeltaMismatchError, match="in 2 places .*adding 'a.'.*adding 'b.'"):
        delta.apply_to(model, check_base=False)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------- repeated merge
def test_merging_the_same_delta_twice_is_refused(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in TinyNet().state_dict().items()}, str(base))
    torch.manual_seed(0)
    handle = sara_train.inject(TinyNet(), sara_train.SaRAConfig(budget=0.2))
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(0.01)
    delta = handle.delta()
    bare, prefixed = delta.save(tmp_path / "d.safetensors"), tmp_path / "d_prefixed.safetensors"
    sara_train.SparseDelta({"diffusion_model." + k: v for k, v in delta.layers.items()}).save(prefixed)
    assert cli("merge", "--base", base, "--delta", f"{bare}:0.8", "--out", tmp_path / "once.safetensors")[0] == 0
    for again in (bare, prefixed):  # the same delta under another key naming is recognised too
        status, stderr = cli(
            "merge",
            "--base",
            tmp_path / "once.safetensors",
            "--delta",
            again,
            "--out",
            tmp_path / "twice.safetensors",
            capsys=capsys,
        )
        assert status == 2 and "already holds this delta (merged at strength 0.8)" in stderr, stderr
        assert not (tmp_path / "twice.safetensors").exists()
    assert (
        cli(
            "merge",
            "--base",
            tmp_path / "once.safetensors",
            "--delta",
            bare,
            "--out",
            tmp_path / "twice.safetensors",
            "--allow-repeat",
        )[0]
        == 0
    )
    twice = load_file(str(tmp_path / "twice.safetensors"))
    expected = load_file(str(base))
    delta.apply_to(expected, strength=1.8)
    for key, tensor in expected.items():
        torch.testing.assert_close(twice[key], tensor, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- image size
def test_a_tiny_extreme_image_costs_little_memory(tmp_path: Path) -> None:
    """An 858-byte 1 x 200,000 PNG used 4 GiB at resolution 64 (the long side was upscaled to 12.8M
    pixels before cropping). The work is now bounded by the output: measured in a fresh process."""
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.new("RGB", (1, 200_000), "red").save(path, optimize=True)
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from sara_train.trainer.data import load_image, load_image_variants
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        view = load_image({str(path)!r}, 64)
        views = load_image_variants({str(path)!r}, 64, "random", 4, True)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps([list(view.pixels.shape), len(views), view.pixels.mean(dim=(1, 2)).tolist(), grown]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shape, count, channel_means, grown_kib = json.loads(result.stdout)
    assert shape == [3, 64, 64] and count == 8
    assert channel_means == pytest.approx([1.0, -1.0, -1.0], abs=1e-3)  # red
    assert grown_kib < 200 * 1024, f"loading grew the process by {grown_kib / 1024:.0f} MiB"


# ------------------------------------------------------------------------------- ignored settings
def test_toml_top_level_and_train_table_both_count(tmp_path: Path) -> None:
    from test_trainer_config import parse

    (tmp_path / "run.toml").write_text('base = "b"\nsteps = 7\n[train]\ndata = "d"\nlearning_rate = 3e-4\n')
    config = parse("--config", str(tmp_path / "run.toml"))
    assert (config.base, config.data, config.steps, config.learning_rate) == ("b", "d", 7, 3e-4)
    (tmp_path / "twice.toml").write_text("steps = 7\n[train]\nsteps = 8\n")
    with pytest.raises(SaRAError, match="steps given both at the top level and in \\[train\\]"):
        parse("--config", str(tmp_path / "twice.toml"))


def test_silently_ignored_options_are_refused(tmp_path: Path, capsys) -> None:
    status, stderr = cli(
        *train_args(tmp_path / "base", tmp_path / "data", tmp_path / "out", "--rank-layers-per-step", "-1"),
        capsys=capsys,
    )
    assert status == 2 and "--rank-layers-per-step must be >= 1" in stderr


def test_resume_refuses_changed_data_but_not_another_spelling(
    tiny_base: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    out = tmp_path / "run"
    args = train_args(tiny_base, data, out, "--steps", "2")
    assert cli(*args)[0] == 0
    respelled = [f"{tmp_path}/./data/" if arg == str(data) else arg for arg in args]
    status, stderr = cli(*respelled, "--resume", capsys=capsys)
    assert status == 0, stderr
    (data / "disc_0.png").write_bytes((data / "disc_1.png").read_bytes())  # replaced at the same path
    status, stderr = cli(*args, "--resume", capsys=capsys)
    assert status == 2 and f"the training data in {data} changed since the run" in stderr, stderr


# ------------------------------------------------------------------------------- one-line errors
def write_delta_with_metadata(path: Path, **metadata: str) -> Path:
    tensors = {
        "w::idx": torch.tensor([0], dtype=torch.int32),
        "w::val": torch.ones(1),
        "w::probe_idx": torch.zeros(0, dtype=torch.int32),
        "w::probe_val": torch.zeros(0),
    }
    save_file(
        tensors,
        str(path),
        metadata={"format": "sara-delta", "format_version": "1", "shapes": json.dumps({"w": [2]}), **metadata},
    )
    return path


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"shapes": json.dumps(["w", 2])}, "'shapes' must be a JSON object"),
        ({"shapes": json.dumps({"w": [2.5]})}, "'shapes' must be a JSON object"),
        ({"selection": json.dumps([1, 2])}, "'selection' must be a JSON object"),
        ({"user": json.dumps({"steps": 3})}, "'user' must be a JSON object of strings"),
        ({"user": "[" * 100_000}, "'user' is not valid JSON"),
    ],
)
def test_malformed_delta_metadata_is_a_format_error(tmp_path: Path, metadata: dict, message: str, capsys) -> None:
    path = write_delta_with_metadata(tmp_path / "bad.safetensors", **metadata)
    with pytest.raises(DeltaFormatError, match=message):
        sara_train.SparseDelta.load(path)
    status, stderr = cli("inspect", path, capsys=capsys)
    assert status == 2 and message.split(" must")[0].split(" is")[0] in stderr and "Traceback" not in stderr


def test_checkpoint_header_that_lies_about_sizes(tmp_path: Path, capsys) -> None:
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "lies.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    delta = sara_train.SparseDelta(
        {"w": sara_train.LayerDelta((4,), torch.tensor([1], dtype=torch.int32), torch.ones(1))}
    ).save(tmp_path / "d.safetensors")
    status, stderr = cli("merge", "--base", path, "--delta", delta, "--out", tmp_path / "o.safetensors", capsys=capsys)
    assert status == 2 and "does not fit its byte range" in stderr and "Traceback" not in stderr
    header = json.dumps({"__metadata__": ["not", "an", "object"]}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(SaRAError, match="__metadata__ must be an object of strings"):
        sara_train.merge_checkpoint(path, delta, tmp_path / "o.safetensors")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "1.5"], "--budget must be a fraction in (0, 1]"),
        (["--budget", "0"], "--budget must be a fraction in (0, 1]"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        (["--caption-extension", ""], "--caption-extension must be a file extension"),
        (["--include", "attn("], "--include 'attn(' is not a valid regular expression"),
        (["--device", "garbage"], "--device 'garbage' is not a device"),
        (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
        (["--rank-layers-per-step", "0"], "--rank-layers-per-step must be >= 1"),
    ],
)
def test_bad_train_options_are_one_line_errors_before_loading(
    tmp_path: Path, flags: list[str], message: str, capsys
) -> None:
    """The base and data named here do not exist: the option error coming first shows it is found
    before anything is loaded."""
    status, stderr = cli(
        *train_args(tmp_path / "no-base", tmp_path / "no-data", tmp_path / "out", *flags), capsys=capsys
    )
    assert status == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1


def test_train_problems_found_later_are_one_line_errors(
    tiny_base: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from single_file import write_single_file_checkpoint

    def fails(*args, message: str) -> None:
        status, stderr = cli(*args, capsys=capsys)
        assert status == 2 and message in stderr and "Traceback" not in stderr, stderr

    fails(*train_args(tiny_base, image_folder, tmp_path / "r1", "--threshold", "1e-30"), message="selects no entries")
    jsonl = tmp_path / "jsonl"
    shutil.copytree(image_folder, jsonl)
    (jsonl / "metadata.jsonl").write_bytes(b'{"file_name": "disc_0.png", "text": "\xff\xfe caf\xe9"}\n')
    fails(*train_args(tiny_base, jsonl, tmp_path / "r2"), message="is not UTF-8 text")
    toml = tmp_path / "latin1.toml"
    toml.write_bytes(b'caption_prefix = "caf\xe9"\n')
    fails("train", "--config", toml, message="cannot be read as UTF-8 text")
    checkpoint = write_single_file_checkpoint(tiny_base, tmp_path / "full.safetensors")
    no_text = {k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("cond_stage_model.")}
    save_file(no_text, str(tmp_path / "no_text_encoder.safetensors"))
    fails(
        *train_args(
            tmp_path / "no_text_encoder.safetensors", image_folder, tmp_path / "r3", "--base-config", tiny_base
        ),
        message="no_text_encoder.safetensors",
    )
    out = tmp_path / "r4"
    assert cli(*train_args(tiny_base, image_folder, out, "--steps", "2"))[0] == 0
    state = out / "state" / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    fails(*train_args(tiny_base, image_folder, out, "--steps", "2", "--resume"), message="is truncated")


# ------------------------------------------------------------------------------- smaller ones
def test_inspect_output_is_valid_json_and_inert_text(tmp_path: Path, capsys) -> None:
    delta = sara_train.SparseDelta(
        {"w": sara_train.LayerDelta((4,), torch.tensor([1], dtype=torch.int32), torch.ones(1))},
        selection={"threshold": float("nan")},
        metadata={"note": "\x1b[31mred\x1b[0m\n"},
    )
    path = delta.save(tmp_path / "d.safetensors")
    assert cli("inspect", path, "--json")[0] == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"invalid JSON: {name}"))
    assert report["selection"]["threshold"] == "nan" and report["metadata"]["note"].startswith("\x1b")
    assert cli("inspect", path)[0] == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\\x1b[31mred\\x1b[0m\\n" in text


def test_stacking_mixed_half_dtypes_keeps_fp32() -> None:
    small = sara_train.LayerDelta((4,), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1e-3, 3e-7]))
    large = sara_train.LayerDelta((4,), torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 70000.0]))
    first = sara_train.SparseDelta({"w": small}).to(torch.float16)
    second = sara_train.SparseDelta({"w": large}).to(torch.bfloat16)
    stacked = sara_train.SparseDelta.stack([first, second])
    layer = stacked.layers["w"]
    assert layer.values.dtype == torch.float32
    expected = {
        0: float(first.layers["w"].values[0]),
        1: float(first.layers["w"].values[1]) + 1.0,
        2: float(second.layers["w"].values[1]),
    }
    assert {int(i): float(v) for i, v in zip(layer.flat_indices, layer.values)} == pytest.approx(expected, rel=1e-7)


def test_folder_merge_refuses_out_inside_base_and_link_loops(tiny_base: Path, tmp_path: Path, capsys) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    from tiny_sd import tiny_unet

    handle = sara_train.inject(tiny_unet("sd15"), sara_train.SaRAConfig(budget=0.1))
    delta = handle.delta().save(tmp_path / "d.safetensors")
    status, stderr = cli(
        "merge", "--base", base, "--delta", delta, "--out", base / "merged", "--no-check-base", capsys=capsys
    )
    assert status == 2 and "is inside the base folder" in stderr
    (base / "tokenizer" / "loop").symlink_to("..", target_is_directory=True)
    status, stderr = cli(
        "merge", "--base", base, "--delta", delta, "--out", tmp_path / "merged", "--no-check-base", capsys=capsys
    )
    assert status == 2 and "symbolic-link loop" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "d.safetensors"], "a temporary copy was left"


def test_data_folder_as_output_dir_is_refused(tiny_base: Path, image_folder: Path, tmp_path: Path, capsys) -> None:
    import shutil

    data = shutil.copytree(image_folder, tmp_path / "data")  # a copy: the attack used to write into it
    before = sorted(p.name for p in data.iterdir())
    status, stderr = cli(*train_args(tiny_base, data, data), capsys=capsys)
    assert status == 2 and "is the --data folder" in stderr
    assert sorted(p.name for p in data.iterdir()) == before
