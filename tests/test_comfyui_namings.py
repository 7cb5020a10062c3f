"""One delta path for every entry point: a delta with diffusers key names (what ``handle.delta()`` of a
diffusers UNet or ``sara-train train --key-format diffusers`` writes) loads through SaRA Load and
merges through SaRA Merge Checkpoint in the real ComfyUI, equal to ``sara-train merge``, for the
SD1.5, SD2 and SDXL-family layouts (tiny UNets ComfyUI detects as SD15, SD20 and KOALA_700M)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sara_train import SparseDelta
from sara_train.cli import main as sara_train_main
from sara_train.families.sd_unet import delta_to_diffusers_keys, unet_key_naming, unet_layout_from_ldm_keys
from tools.comfyui_models import write_model
from tools.comfyui_server import make_delta

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def family(request, comfy) -> dict:
    """A tiny UNet of the family in models/unet, the same UNet as a checkpoint, a delta of it with
    diffusers names in models/sara, and that delta merged into the checkpoint by the CLI."""
    server, _ = comfy
    name = request.param
    models = server.base / "models"
    unet = write_model(name, models / "unet" / f"naming_{name}.safetensors")
    base = load_file(str(unet))
    checkpoint = models / "checkpoints" / f"naming_{name}.safetensors"
    save_file({PREFIX + key: value for key, value in base.items()}, str(checkpoint))
    delta = delta_to_diffusers_keys(make_delta(base, 11, 0.05), unet_layout_from_ldm_keys(base))
    assert unet_key_naming(delta.layers) == "diffusers"
    delta_file = delta.save(models / "sara" / f"naming_{name}_diffusers.safetensors")
    merged = server.base / f"naming_{name}_cli.safetensors"
    assert sara_train_main(["merge", "--base", str(checkpoint), "--delta", str(delta_file), "--out", str(merged)]) == 0
    return {"name": name, "server": server, "delta": delta, "cli": load_file(str(merged)), "base": base}


def unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(str(path)).items() if key.startswith(PREFIX)}


def test_sara_load_of_a_diffusers_named_delta_equals_the_cli_merge(family: dict) -> None:
    server, name = family["server"], family["name"]
    server.run_ok(
        {
            "unet": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": f"naming_{name}.safetensors", "weight_dtype": "default"},
            },
            "sara": {
                "class_type": "SaRALoader",
                "inputs": {
                    "model": ["unet", 0],
                    "strength": 1.0,
                    "delta_name": f"naming_{name}_diffusers.safetensors",
                },
            },
            "save": {
                "class_type": "ModelSave",
                "inputs": {"model": ["sara", 0], "filename_prefix": f"diffusion_models/naming_{name}_loaded"},
            },
        }
    )
    (saved,) = (server.base / "output" / "diffusion_models").glob(f"naming_{name}_loaded_*.safetensors")
    loaded, cli = unet_tensors(saved), family["cli"]
    assert set(loaded) == set(cli)
    assert all(torch.equal(loaded[key], cli[key]) for key in cli)
    changed = [key for key in cli if not torch.equal(cli[key], family["base"][key.removeprefix(PREFIX)])]
    assert len(changed) == len(family["delta"].layers)


def test_merge_checkpoint_node_with_a_diffusers_named_delta_equals_the_cli_merge(family: dict) -> None:
    server, name = family["server"], family["name"]
    server.run_ok(
        {
            "merge": {
                "class_type": "SaRAMergeCheckpoint",
                "inputs": {
                    "ckpt_name": f"naming_{name}.safetensors",
                    "delta_1": f"naming_{name}_diffusers.safetensors",
                    "strength_1": 1.0,
                    "delta_2": "[None]",
                    "strength_2": 1.0,
                    "delta_3": "[None]",
                    "strength_3": 1.0,
                    "filename_prefix": f"naming_{name}_node",
                },
            }
        }
    )
    node = load_file(str(server.base / "models" / "checkpoints" / f"naming_{name}_node_00001_.safetensors"))
    cli = family["cli"]
    assert set(node) == set(cli) and all(torch.equal(node[key], cli[key]) for key in cli)
    assert SparseDelta.load(server.base / "models" / "sara" / f"naming_{name}_diffusers.safetensors").num_entries > 0
