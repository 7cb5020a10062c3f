"""SaRA nodes inside a real ComfyUI server, driven over HTTP (see comfyui_server.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sara_train
from sara_train.engine.analysis import threshold_for_budget
from tools.comfyui_server import LORA_TARGETS, ComfyUIServer, execution_error


def save_graph(loaders: list[tuple[str, float]], prefix: str) -> dict:
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "default"}}
    }
    model = ["unet", 0]
    for i, (name, strength) in enumerate(loaders):
        graph[f"sara{i}"] = {
            "class_type": "SaRALoader",
            "inputs": {"model": model, "delta_name": name, "strength": strength},
        }
        model = [f"sara{i}", 0]
    graph["save"] = {
        "class_type": "ModelSave",
        "inputs": {"model": model, "filename_prefix": f"diffusion_models/{prefix}"},
    }
    return graph


def saved_unet(server: ComfyUIServer, prefix: str) -> dict[str, torch.Tensor]:
    (path,) = (server.base / "output" / "diffusion_models").glob(f"{prefix}_*.safetensors")
    return {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(path)).items()}


def test_object_info_lists_the_loader(comfy) -> None:
    server, _ = comfy
    info = server.get("/object_info/SaRALoader")["SaRALoader"]
    required = info["input"]["required"]
    assert set(required) == {"model", "delta_name", "strength"}
    kind, options = required["delta_name"]
    assert kind == "COMBO" and {"a.safetensors", "b.safetensors"} <= set(options["options"])
    assert info["output"] == ["MODEL"] and info["category"] == "sara"


def test_loaded_weights_are_base_plus_delta_and_untouched_elsewhere(comfy) -> None:
    server, base = comfy
    server.run_ok(save_graph([("a.safetensors", 0.7)], "a07"))
    saved = saved_unet(server, "a07")
    delta = sara_train.SparseDelta.load(server.base / "models" / "sara" / "a.safetensors")
    expected = {k: v.clone() for k, v in base.items()}
    delta.apply_to(expected, strength=0.7)
    assert set(saved) == set(base)
    for key, tensor in expected.items():
        if key in delta.layers:
            torch.testing.assert_close(saved[key].float(), tensor.float(), rtol=1e-6, atol=1e-7)
            changed = (saved[key] != base[key]).flatten()
            assert changed.nonzero().squeeze(1).to(torch.int32).tolist() == delta.layers[key].flat_indices.tolist()
        else:
            assert torch.equal(saved[key], base[key]), f"{key} changed"


def test_strength_zero_is_the_base_and_stacked_deltas_add(comfy) -> None:
    server, base = comfy
    server.run_ok(save_graph([("a.safetensors", 0.0)], "zero"))
    for key, tensor in saved_unet(server, "zero").items():
        assert torch.equal(tensor, base[key])
    server.run_ok(save_graph([("a.safetensors", 1.0), ("b.safetensors", 0.5)], "stacked"))
    folder = server.base / "models" / "sara"
    summed = sara_train.SparseDelta.stack(
        [sara_train.SparseDelta.load(folder / "a.safetensors"), sara_train.SparseDelta.load(folder / "b.safetensors")],
        [1.0, 0.5],
    )
    expected = {k: v.clone() for k, v in base.items()}
    summed.apply_to(expected)
    for key, tensor in saved_unet(server, "stacked").items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name, message",
    [
        ("other_model.safetensors", "delta keys are not in the model"),
        ("truncated.safetensors", "truncated"),
        ("pickled.safetensors", "pickle"),
    ],
)
def test_bad_deltas_are_node_errors_and_the_server_keeps_serving(comfy, name: str, message: str) -> None:
    server, _ = comfy
    entry = server.run(save_graph([(name, 1.0)], f"bad_{name}"))
    assert entry["status"]["status_str"] == "error"
    assert message in execution_error(entry)
    assert not list((server.base / "output").rglob(f"bad_{name}*"))
    assert "SaRALoader" in server.get("/object_info/SaRALoader")


def merge_graph(prefix: str, strength_2: float) -> dict:
    return {
        "merge": {
            "class_type": "SaRAMergeCheckpoint",
            "inputs": {
                "ckpt_name": "tiny_ckpt.safetensors",
                "delta_1": "a.safetensors",
                "strength_1": 1.0,
                "delta_2": "b.safetensors",
                "strength_2": strength_2,
                "delta_3": "[None]",
                "strength_3": 1.0,
                "filename_prefix": prefix,
            },
        }
    }


def test_merge_checkpoint_node_bakes_stacked_deltas(comfy) -> None:
    server, _ = comfy
    server.run_ok(merge_graph("merged_ab", 0.5))
    folder = server.base / "models"
    merged = load_file(str(folder / "checkpoints" / "merged_ab_00001_.safetensors"))
    expected = load_file(str(folder / "checkpoints" / "tiny_ckpt.safetensors"))
    sara_train.SparseDelta.stack(
        [
            sara_train.SparseDelta.load(folder / "sara" / "a.safetensors"),
            sara_train.SparseDelta.load(folder / "sara" / "b.safetensors"),
        ],
        [1.0, 0.5],
    ).apply_to(expected)
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-6, atol=1e-7)

    before = (folder / "checkpoints" / "merged_ab_00001_.safetensors").read_bytes()
    server.run_ok(merge_graph("merged_ab", 0.25))  # the same prefix again: the next number, nothing overwritten
    assert (folder / "checkpoints" / "merged_ab_00001_.safetensors").read_bytes() == before
    assert (folder / "checkpoints" / "merged_ab_00002_.safetensors").exists()

    entry = server.run(merge_graph("../outside", 0.5))
    assert entry["status"]["status_str"] == "error" and "leads outside" in execution_error(entry)
    assert not list(folder.glob("outside*"))


def test_inspect_reports_the_thresholds_sara_would_use(comfy) -> None:
    """Also right after sampling with a SaRA-loaded copy of the same model (whose patched weights the
    shared module then holds): Inspect measures the model it is given, not the last one sampled."""
    server, base = comfy
    server.run_ok(sample_graph("tiny_full.safetensors", "before_inspect", delta="a.safetensors", strength=10.0))
    graph = {
        "unet": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_full.safetensors"}},
        "inspect": {
            "class_type": "SaRAInspect",
            "inputs": {"model": ["unet", 0], "budgets": "0.01, 0.05", "delta_name": "a.safetensors"},
        },
        "text": {"class_type": "PreviewAny", "inputs": {"source": ["inspect", 1]}},
        "image": {"class_type": "PreviewImage", "inputs": {"images": ["inspect", 0]}},
    }
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    text = entry["outputs"]["text"]["text"][0]
    weights = [v for v in base.values() if v.dim() >= 2]  # the Linear and Conv weights
    for budget in (0.01, 0.05):
        expected = threshold_for_budget(weights, budget)
        assert f"budget {budget:.1%} -> threshold {expected:.6g}" in text
    assert f"{len(weights)} tensors" in text and "SaRA delta:" in text
    (image,) = entry["outputs"]["image"]["images"]
    with Image.open(server.base / image["type"] / image["subfolder"] / image["filename"]) as picture:
        assert picture.size == (640, 360)
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 3  # bars, lines, text: not blank

    bad = dict(
        graph,
        inspect={
            "class_type": "SaRAInspect",
            "inputs": {"model": ["unet", 0], "budgets": "five percent", "delta_name": "[None]"},
        },
    )
    entry = server.run(bad)
    assert entry["status"]["status_str"] == "error" and "comma-separated fractions" in execution_error(entry)


def sample_graph(ckpt_name: str, prefix: str, delta: str | None = None, strength: float = 1.0) -> dict:
    """Load a checkpoint (optionally + SaRA Load), sample 2 Euler steps of an 8x8 latent, save the latent."""
    model = ["ckpt", 0]
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a glyph, serif"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "save": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sample", 0], "filename_prefix": f"latents/{prefix}"},
        },
    }
    if delta is not None:
        graph["sara"] = {
            "class_type": "SaRALoader",
            "inputs": {"model": model, "delta_name": delta, "strength": strength},
        }
        model = ["sara", 0]
    graph["sample"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "seed": 7,
            "steps": 2,
            "cfg": 2.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
    return graph


def saved_latent(server: ComfyUIServer, prefix: str) -> torch.Tensor:
    (path,) = (server.base / "output" / "latents").glob(f"{prefix}_*.latent")
    return load_file(str(path))["latent_tensor"]


def test_sampling_with_loaded_delta_equals_merged_checkpoint_and_differs_from_base(comfy) -> None:
    server, _ = comfy
    server.run_ok(
        {
            "merge": {
                "class_type": "SaRAMergeCheckpoint",
                "inputs": {
                    "ckpt_name": "tiny_full.safetensors",
                    "delta_1": "a.safetensors",
                    "strength_1": 1.0,
                    "delta_2": "[None]",
                    "strength_2": 1.0,
                    "delta_3": "[None]",
                    "strength_3": 1.0,
                    "filename_prefix": "tiny_full_a",
                },
            }
        }
    )
    server.run_ok(sample_graph("tiny_full.safetensors", "base"))
    server.run_ok(sample_graph("tiny_full.safetensors", "loaded", delta="a.safetensors"))
    server.run_ok(sample_graph("tiny_full_a_00001_.safetensors", "merged"))
    base, loaded, merged = (saved_latent(server, name) for name in ("base", "loaded", "merged"))
    torch.testing.assert_close(loaded, merged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-4)

    graph = sample_graph("tiny_full.safetensors", "unused", delta="a.safetensors")
    graph = {key: graph[key] for key in ("ckpt", "sara")}
    graph["save_ckpt"] = {
        "class_type": "CheckpointSave",
        "inputs": {
            "model": ["sara", 0],
            "clip": ["ckpt", 1],
            "vae": ["ckpt", 2],
            "filename_prefix": "checkpoints/builtin_save",
        },
    }
    server.run_ok(graph)
    (builtin,) = (server.base / "output" / "checkpoints").glob("builtin_save_*.safetensors")
    saved, ours = (
        load_file(str(builtin)),
        load_file(str(server.base / "models" / "checkpoints" / "tiny_full_a_00001_.safetensors")),
    )
    unet_keys = [k for k in ours if k.startswith("model.diffusion_model.")]
    assert unet_keys and set(unet_keys) <= set(saved)
    for key in unet_keys:
        torch.testing.assert_close(saved[key].float(), ours[key].float(), rtol=1e-6, atol=1e-7)


def test_chains_after_a_lora(comfy) -> None:
    server, base = comfy
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "default"}},
        "lora": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["unet", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 0.8},
        },
        "sara": {
            "class_type": "SaRALoader",
            "inputs": {"model": ["lora", 0], "delta_name": "a.safetensors", "strength": 1.0},
        },
        "save": {
            "class_type": "ModelSave",
            "inputs": {"model": ["sara", 0], "filename_prefix": "diffusion_models/lora_sara"},
        },
    }
    server.run_ok(graph)
    lora = load_file(str(server.base / "models" / "loras" / "tiny_lora.safetensors"))
    expected = {k: v.clone() for k, v in base.items()}
    for name in LORA_TARGETS:
        up, down = lora[f"diffusion_model.{name}.lora_up.weight"], lora[f"diffusion_model.{name}.lora_down.weight"]
        expected[name + ".weight"] += 0.8 * (up @ down)
    # the LoRA moved the probe entries, so the reference skips the base check; the node checked
    # the unpatched weights (ComfyUI applies patches lazily) and passed
    sara_train.SparseDelta.load(server.base / "models" / "sara" / "a.safetensors").apply_to(expected, check_base=False)
    saved = saved_unet(server, "lora_sara")
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(saved[name + ".weight"], base[name + ".weight"]) for name in LORA_TARGETS)


def export_and_load(server: ComfyUIServer, prefix: str, strengths: list[float], **export_options) -> list[Path]:
    """Run SaRA Export on delta a, then load the file with ComfyUI's own LoraLoaderModelOnly at each
    strength and save the model; returns the export's path (the saved models: ``saved_unet``)."""
    options = {"format": "webui-diff", "naming": "ldm", "values_dtype": "fp32", "rank": 32, "max_error": 0.1}
    options.update(export_options)
    graph = {"export": {"class_type": "SaRAExport", "inputs": {"delta_name": "a.safetensors", **options}}}
    graph["export"]["inputs"]["filename_prefix"] = prefix
    server.run_ok(graph)
    (path,) = (server.base / "models" / "loras").glob(f"{prefix}_*")
    for strength in strengths:
        server.run_ok(
            {
                "unet": {
                    "class_type": "UNETLoader",
                    "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "default"},
                },
                "lora": {
                    "class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["unet", 0], "lora_name": path.name, "strength_model": strength},
                },
                "save": {
                    "class_type": "ModelSave",
                    "inputs": {"model": ["lora", 0], "filename_prefix": f"diffusion_models/{prefix}_{strength}"},
                },
            }
        )
    return path


def test_comfyui_lora_loader_reads_the_exact_export_as_base_plus_delta(comfy) -> None:
    server, base = comfy
    delta = sara_train.SparseDelta.load(server.base / "models" / "sara" / "a.safetensors")
    export_and_load(server, "exact32", [1.0, 0.5])
    for strength in (1.0, 0.5):
        expected = {k: v.clone() for k, v in base.items()}
        delta.apply_to(expected, strength=strength)
        saved = saved_unet(server, f"exact32_{strength}")
        assert set(saved) == set(base)
        for key in base:
            assert torch.equal(saved[key], expected[key]), key  # fp32 file: bit-equal
    assert "lora key not loaded" not in server.read_log()
    export_and_load(server, "exact16", [1.0], values_dtype="fp16")
    saved = saved_unet(server, "exact16_1.0")
    for key, layer in delta.layers.items():
        at = layer.flat_indices.long()
        added = saved[key].flatten()[at] - base[key].flatten()[at]
        step = 2.0 ** (torch.floor(torch.log2(layer.values.abs())) - 10)  # one fp16 step at each value
        assert bool(((added - layer.values).abs() <= step + 1e-7).all()), key


def test_comfyui_lora_loader_reads_the_svd_export_with_the_error_it_reported(comfy) -> None:
    server, base = comfy
    delta = sara_train.SparseDelta.load(server.base / "models" / "sara" / "a.safetensors")
    path = export_and_load(server, "svd", [1.0], format="lora", rank=16, max_error=1.0)
    reported = float(safe_open(str(path), framework="pt").metadata()["sara_relative_error"])
    saved = saved_unet(server, "svd_1.0")
    residual = total = 0.0
    for key, layer in delta.layers.items():
        dense = torch.zeros(layer.shape).view(-1)
        dense[layer.flat_indices.long()] = layer.values
        residual += float(((saved[key] - base[key]).flatten() - dense).double().pow(2).sum())
        total += float(dense.double().pow(2).sum())
    assert (residual / total) ** 0.5 == pytest.approx(reported, rel=1e-3)
    assert 0 < reported < 1
