"""The nodes in a ComfyUI-Manager install: the pack cloned into custom_nodes/ with only ComfyUI's
requirements and ours (no diffusers, accelerate, matplotlib or peft, and ``sara_train`` not
installed as a package: the pack loads it from its own folder). Every node imports and runs there.
The environment is made by ``tests/manager_env/sitecustomize.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.comfyui_graphs import saved_delta, train_graph, with_save
from tools.comfyui_server import ComfyUIServer

MANAGER_ENV = Path(__file__).parent / "manager_env"


@pytest.fixture(scope="module")
def manager_server(comfy, tmp_path_factory):
    """A second server on the session server's models and inputs, started in the Manager-like environment."""
    shared, _ = comfy
    base = tmp_path_factory.mktemp("manager")
    for name in ("models", "input"):
        (base / name).symlink_to(shared.base / name, target_is_directory=True)
    server = ComfyUIServer(base, env={"PYTHONPATH": str(MANAGER_ENV)})
    yield server
    server.stop()


def test_every_node_imports_and_runs_without_the_trainer_packages(manager_server) -> None:
    server = manager_server
    assert (
        "importable on its own: False; blocked: ['accelerate', 'diffusers', 'matplotlib', 'peft']" in server.read_log()
    )
    for node in (
        "SaRATrain",
        "SaRASave",
        "SaRALoader",
        "SaRAApply",
        "SaRAMergeCheckpoint",
        "SaRAMergeDiffusionModel",
        "SaRAExport",
        "SaRAInspect",
    ):
        assert node in server.get(f"/object_info/{node}"), node
    graph = with_save(train_graph(steps=2), "manager")
    graph["load"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["ckpt", 0], "delta_name": "a.safetensors", "strength": 0.5},
    }
    graph["apply"] = {
        "class_type": "SaRAApply",
        "inputs": {"model": ["load", 0], "delta": ["train", 1], "strength": 1.0},
    }
    graph["empty"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    graph["sample"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["apply", 0],
            "positive": ["pos", 0],
            "negative": ["pos", 0],
            "latent_image": ["empty", 0],
            "seed": 1,
            "steps": 1,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
    graph["keep"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "manager"}}
    graph["inspect"] = {
        "class_type": "SaRAInspect",
        "inputs": {"model": ["ckpt", 0], "budgets": "0.05", "delta_name": "a.safetensors"},
    }
    graph["histogram"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["inspect", 0], "filename_prefix": "manager"},
    }
    graph["merge"] = {
        "class_type": "SaRAMergeCheckpoint",
        "inputs": {
            "ckpt_name": "tiny_ckpt.safetensors",
            "delta_1": "a.safetensors",
            "strength_1": 1.0,
            "delta_2": "[None]",
            "strength_2": 1.0,
            "delta_3": "[None]",
            "strength_3": 1.0,
            "filename_prefix": "manager_merged",
        },
    }
    graph["export"] = {
        "class_type": "SaRAExport",
        "inputs": {
            "delta_name": "a.safetensors",
            "format": "lora",
            "naming": "ldm",
            "values_dtype": "fp16",
            "rank": 64,
            "max_error": 1.0,
            "filename_prefix": "manager_lora",
        },
    }
    entry = server.run_ok(graph)
    assert entry["outputs"]["train"]["sara_status"][0].startswith("done: 2/2 steps")
    assert list((server.base / "models" / "loras").glob("manager_lora_00001_.safetensors"))
    assert saved_delta(server.base, "manager").exists()
    assert list((server.base / "output").glob("manager_*.latent")) and list(
        (server.base / "output").glob("manager_*.png")
    )
    assert list((server.base / "models" / "checkpoints").glob("manager_merged_00001_.safetensors"))
    assert (
        "seconds: " + str(server.base / "custom_nodes" / "comfyui-sara") in server.read_log()
    )  # imported, not "(IMPORT FAILED)"
