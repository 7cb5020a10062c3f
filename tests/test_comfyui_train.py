"""SaRA Train / Save / Apply inside a real ComfyUI server, driven over HTTP.

The graphs train the tiny SD1.5-detected UNet of ``tiny_full.safetensors`` on VAE-encoded PNGs
with CLIP-encoded prompts (random CLIP-L and VAE), on the CPU, in fp32 for exact comparisons.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file, save_file

import sara_train
from tools.comfyui_graphs import (
    CKPT,
    output_file,
    saved_delta,
    train_graph,
    unet_of,
    with_model_save,
    with_sampling,
    with_save,
)
from tools.comfyui_server import execution_error


@pytest.fixture(scope="module")
def trained(comfy):
    """One 30-step training run: its history entry, the saved fp32 delta, and the saved weights."""
    server, _ = comfy
    graph = with_save(train_graph(save_every=15, save_prefix="periodic"), "trained")
    with_model_save(graph, ["train", 0], "trained_model")
    with_sampling(graph, ["train", 0], "trained")
    entry = server.run_ok(graph)
    delta = sara_train.SparseDelta.load(saved_delta(server.base, "trained"))
    weights = unet_of(load_file(output_file(server, "diffusion_models", "trained_model")))
    return entry, delta, weights


def test_object_info_lists_every_node_with_its_inputs(comfy) -> None:
    server, _ = comfy
    expected = {
        "SaRATrain": {
            "model",
            "latents",
            "positive",
            "steps",
            "batch_size",
            "grad_accumulation",
            "learning_rate",
            "budget",
            "threshold",
            "rank_loss_weight",
            "progressive_fraction",
            "seed",
            "training_dtype",
            "gradient_checkpointing",
            "save_every",
            "save_prefix",
            "existing_delta",
            "timestep_sampling",
            "min_snr_gamma",
            "caption_dropout",
            "ema_decay",
            "dropout_conditioning",
        },
        "SaRASave": {"delta", "filename_prefix", "values_dtype"},
        "SaRALoader": {"model", "delta_name", "strength"},
        "SaRAApply": {"model", "delta", "strength"},
        "SaRAMergeCheckpoint": {"ckpt_name", "delta_1", "strength_1", "filename_prefix"},
        "SaRAMergeDiffusionModel": {"unet_name", "delta_1", "strength_1", "filename_prefix"},
        "SaRAExport": {"delta_name", "format", "naming", "values_dtype", "rank", "max_error", "model"},
        "SaRAInspect": {"model", "budgets"},
    }
    for node, inputs in expected.items():
        info = server.get(f"/object_info/{node}")[node]
        assert info["category"] == "sara"
        assert inputs <= set(info["input"]["required"]) | set(info["input"].get("optional", {})), node
    train = server.get("/object_info/SaRATrain")["SaRATrain"]
    assert train["output"] == ["MODEL", "SARA_DELTA", "LOSS_MAP", "SARA_DELTA"]
    assert train["output_name"][3] == "ema_delta"


def test_training_lowers_the_loss_on_the_same_draws(comfy, trained) -> None:
    """Same seed => same images, sigmas and noise per step; with lr ~ 0 the loss stays the base
    model's. The trained run's loss at step k (after k-1 updates) must be below the base's."""
    server, _ = comfy
    entry, _, _ = trained
    losses = entry["outputs"]["train"]["sara_loss"]
    untrained = server.run_ok(train_graph(learning_rate=1e-8))["outputs"]["train"]["sara_loss"]
    assert len(losses) == len(untrained) == 30
    assert losses[0] == pytest.approx(untrained[0], rel=1e-6)  # same draw, same (untouched) model
    ratios = [a / b for a, b in zip(losses[15:], untrained[15:])]
    assert sum(ratios) / len(ratios) < 0.98, ratios
    assert sum(r < 1 for r in ratios) >= 13, ratios
    assert entry["outputs"]["train"]["sara_status"][0].startswith("done: 30/30 steps")


def test_trained_model_is_base_plus_delta_and_the_base_is_restored(comfy, trained) -> None:
    server, base = comfy
    _, delta, weights = trained
    assert delta.metadata["steps"] == "30" and delta.metadata["base_model_type"] == "SD15"
    assert delta.metadata["option_learning_rate"] == "0.01" and float(delta.metadata["final_loss"]) > 0
    threshold = delta.selection["threshold"]
    assert delta.num_entries > 0
    changed = 0
    for key, tensor in base.items():
        if key not in delta.layers:
            assert torch.equal(weights[key], tensor), key
            continue
        layer = delta.layers[key]
        index = layer.flat_indices.long()
        assert (tensor.flatten()[index].abs() <= threshold).all(), key  # only small-|w| entries moved
        expected = tensor.flatten().clone()
        expected[index] += layer.values
        assert torch.allclose(weights[key].flatten(), expected, atol=1e-6), key
        untouched = torch.ones(tensor.numel(), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(weights[key].flatten()[untouched], tensor.flatten()[untouched]), key
        changed += int((layer.values != 0).sum())
    assert changed > 0.5 * delta.num_entries
    # The shared ComfyUI model went back to the pretrained weights bit-exactly.
    server.run_ok(
        with_model_save(
            {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}},
            ["ckpt", 0],
            "after_training",
        )
    )
    after = unet_of(load_file(output_file(server, "diffusion_models", "after_training")))
    assert all(torch.equal(after[key], base[key]) for key in base)


def test_periodic_saves_are_complete_deltas(comfy, trained) -> None:
    server, _ = comfy
    _, delta, _ = trained
    files = sorted(p.name for p in (server.base / "models" / "sara").glob("periodic_*"))
    assert files == ["periodic_00001_step15.safetensors", "periodic_00001_step30.safetensors"]
    last = sara_train.SparseDelta.load(server.base / "models" / "sara" / files[-1])
    first = sara_train.SparseDelta.load(server.base / "models" / "sara" / files[0])
    assert last.layers.keys() == delta.layers.keys()
    for key, layer in last.layers.items():
        assert torch.equal(layer.flat_indices, delta.layers[key].flat_indices)
        assert torch.equal(layer.values, delta.layers[key].values.half())  # periodic saves are fp16
    assert not all(torch.equal(first.layers[k].values, last.layers[k].values) for k in last.layers)


def test_sampling_with_the_trained_model_equals_loading_the_saved_delta(comfy, trained) -> None:
    server, _ = comfy
    graph = train_graph()
    graph = {k: v for k, v in graph.items() if k in ("ckpt", "pos")}
    graph["loader"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["ckpt", 0], "delta_name": saved_delta(server.base, "trained").name, "strength": 1.0},
    }
    with_sampling(graph, ["loader", 0], "loaded")
    with_sampling(graph, ["ckpt", 0], "base")
    server.run_ok(graph)
    latent = {
        name: load_file(output_file(server, "latents", name))["latent_tensor"]
        for name in ("trained", "loaded", "base")
    }
    assert torch.allclose(latent["trained"], latent["loaded"], atol=1e-5)
    assert not torch.allclose(latent["trained"], latent["base"], atol=1e-3)


def test_apply_node_and_loss_map_feed_builtin_nodes(comfy) -> None:
    """SaRA Apply at strength 0 gives the base; LOSS_MAP plots through the built-in loss graph."""
    server, base = comfy
    graph = train_graph(steps=3)
    graph["apply0"] = {
        "class_type": "SaRAApply",
        "inputs": {"model": ["ckpt", 0], "delta": ["train", 1], "strength": 0.0},
    }
    graph["apply1"] = {
        "class_type": "SaRAApply",
        "inputs": {"model": ["ckpt", 0], "delta": ["train", 1], "strength": 1.0},
    }
    with_model_save(graph, ["apply0", 0], "apply0")
    with_model_save(graph, ["apply1", 0], "apply1")
    with_model_save(graph, ["train", 0], "train3")
    graph["plot"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["train", 2], "filename_prefix": "sara_loss"}}
    entry = server.run_ok(graph)
    zero = unet_of(load_file(output_file(server, "diffusion_models", "apply0")))
    one = unet_of(load_file(output_file(server, "diffusion_models", "apply1")))
    trained3 = unet_of(load_file(output_file(server, "diffusion_models", "train3")))
    assert all(torch.equal(zero[k], base[k]) for k in base)
    assert all(torch.equal(one[k], trained3[k]) for k in base)
    assert any(not torch.equal(one[k], base[k]) for k in base)
    assert entry["outputs"]["plot"]["images"], "the built-in Plot Loss Graph node drew the LOSS_MAP"


def test_continuing_from_a_delta_includes_it(comfy, trained) -> None:
    server, _ = comfy
    _, delta, _ = trained
    server.run_ok(
        with_save(
            train_graph(steps=2, learning_rate=1e-8, existing_delta=saved_delta(server.base, "trained").name),
            "continued",
        )
    )
    continued = sara_train.SparseDelta.load(saved_delta(server.base, "continued"))
    assert continued.metadata["steps"] == "32"
    assert continued.base_fingerprint == delta.base_fingerprint
    for key, layer in delta.layers.items():
        dense = torch.zeros(layer.shape).flatten()
        dense[layer.flat_indices.long()] = layer.values
        other = continued.layers[key]
        dense_other = torch.zeros(layer.shape).flatten()
        dense_other[other.flat_indices.long()] = other.values
        assert torch.allclose(dense, dense_other, atol=1e-5), key


def test_per_image_conditioning_trains(comfy) -> None:
    """One CONDITIONING with one entry per image (the Train LoRA convention) pairs prompts with images."""
    server, _ = comfy
    graph = train_graph(steps=2)
    graph["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a blue square"}}
    graph["both"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["pos", 0], "conditioning_2": ["pos2", 0]},
    }
    graph["train"]["inputs"]["positive"] = ["both", 0]
    entry = server.run_ok(graph)
    assert len(entry["outputs"]["train"]["sara_loss"]) == 2
    graph["train"]["inputs"]["latents"] = ["enc0", 0]  # 1 image, 2 conditionings: combined, not paired
    server.run_ok(graph)


def test_default_bf16_training_runs_and_learns(comfy) -> None:
    """The default mixed precision (bf16 compute through ComfyUI's manual cast + autocast)."""
    server, _ = comfy
    server.run_ok(with_save(train_graph(steps=3, training_dtype="bf16"), "bf16_run"))
    delta = sara_train.SparseDelta.load(saved_delta(server.base, "bf16_run"))
    assert delta.metadata["option_training_dtype"] == "bf16"
    values = torch.cat([layer.values.float() for layer in delta.layers.values()])
    assert torch.isfinite(values).all() and (values != 0).float().mean() > 0.5


def test_ema_delta_is_the_closed_form_of_the_per_step_deltas(comfy) -> None:
    """With decay d, the ema_delta output equals sum_t (1 - d) d^(T-t) delta_t over the deltas saved after
    every step (fp16), on the same entries; the periodic saves write the EMA beside each delta. Run
    with logit-normal timesteps and min-SNR weighting (an epsilon model)."""
    server, _ = comfy
    decay, steps = 0.6, 4
    graph = train_graph(
        steps=steps,
        save_every=1,
        save_prefix="ema_run",
        ema_decay=decay,
        progressive_fraction=0.0,
        timestep_sampling="logit_normal",
        min_snr_gamma=5.0,
    )
    graph["save_ema"] = {
        "class_type": "SaRASave",
        "inputs": {"delta": ["train", 3], "filename_prefix": "ema_out", "values_dtype": "fp32"},
    }
    server.run_ok(graph)
    folder = server.base / "models" / "sara"
    per_step = [sara_train.SparseDelta.load(p) for p in sorted(folder.glob("ema_run_*_step?.safetensors"))]
    assert len(per_step) == steps
    ema = sara_train.SparseDelta.load(saved_delta(server.base, "ema_out"))
    [periodic_ema] = [sara_train.SparseDelta.load(p) for p in folder.glob(f"ema_run_*_step{steps}_ema.safetensors")]
    assert ema.metadata["ema_updates"] == str(steps) and ema.metadata["option_min_snr_gamma"] == "5.0"
    assert ema.layers.keys() == per_step[-1].layers.keys()
    for key, layer in ema.layers.items():
        expected = sum(
            (1 - decay) * decay ** (steps - t) * per_step[t - 1].layers[key].values.float()
            for t in range(1, steps + 1)
        )
        assert torch.equal(layer.flat_indices, per_step[-1].layers[key].flat_indices), key
        largest = max(float(delta.layers[key].values.float().abs().max()) for delta in per_step)
        torch.testing.assert_close(layer.values, expected, rtol=2e-3, atol=largest * 2**-11)  # fp16 saves
        assert torch.equal(periodic_ema.layers[key].values, layer.values.half()), key
    assert not torch.allclose(ema.layers[key].values, per_step[-1].layers[key].values.float(), atol=1e-6)


def test_caption_dropout_trains_with_the_dropout_conditioning_at_its_rate(comfy) -> None:
    """Rate 1 with a dropout conditioning B learns exactly what rate 0 with prompt B learns (the dropout
    draws never move the other draws); a seeded run at rate 0.3 drops close to 30% of the images."""
    server, _ = comfy
    blue = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a blue square"}}
    all_dropped = train_graph(steps=3, caption_dropout=1.0)
    all_dropped["blue"] = blue
    all_dropped["train"]["inputs"]["dropout_conditioning"] = ["blue", 0]
    server.run_ok(with_save(all_dropped, "all_dropped"))
    prompted = train_graph(steps=3)
    prompted["blue"] = blue
    prompted["train"]["inputs"]["positive"] = ["blue", 0]
    server.run_ok(with_save(prompted, "prompt_blue"))
    dropped = sara_train.SparseDelta.load(saved_delta(server.base, "all_dropped"))
    reference = sara_train.SparseDelta.load(saved_delta(server.base, "prompt_blue"))
    assert dropped.metadata["captions_dropped"] == "6 of 6" and reference.metadata["captions_dropped"] == "0 of 6"
    for key, layer in reference.layers.items():
        assert torch.equal(dropped.layers[key].values, layer.values), key

    server.run_ok(with_save(train_graph(steps=25, learning_rate=1e-8, caption_dropout=0.3), "rate_run"))
    count, _, drawn = (
        sara_train.SparseDelta.load(saved_delta(server.base, "rate_run")).metadata["captions_dropped"].split()
    )
    assert drawn == "50" and 0.15 <= int(count) / 50 <= 0.45, count  # 0.3 +- 2.3 standard deviations


def nan_clip_lora(path) -> None:
    """A LoRA whose update of CLIP layer 0's fc2 is NaN: every CLIPTextEncode through it is NaN."""
    save_file(
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": torch.full((768, 1), float("nan")),
            "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": torch.ones(1, 3072),
        },
        str(path),
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("zero_latents", "all zeros"),
        ("nan_conditioning", "conditioning 1 contains NaN"),
        ("other_model_delta", "delta is for another model"),
        ("bad_prefix", "filename prefix '../escape' leads outside"),
    ],
)
def test_bad_training_inputs_are_node_errors(comfy, case: str, message: str) -> None:
    server, _ = comfy
    graph = train_graph(steps=2)
    if case == "zero_latents":
        graph["empty"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
        graph["train"]["inputs"]["latents"] = ["empty", 0]
    elif case == "nan_conditioning":
        nan_clip_lora(server.base / "models" / "loras" / "nan_clip.safetensors")
        graph["lora"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["ckpt", 0],
                "clip": ["ckpt", 1],
                "lora_name": "nan_clip.safetensors",
                "strength_model": 0.0,
                "strength_clip": 1.0,
            },
        }
        graph["pos"]["inputs"]["clip"] = ["lora", 1]
    elif case == "other_model_delta":
        graph["train"]["inputs"]["existing_delta"] = "other_model.safetensors"
    else:
        graph["train"]["inputs"].update(save_every=1, save_prefix="../escape")
    before = sorted(p.name for p in (server.base / "models" / "sara").iterdir())
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    assert message in execution_error(entry), execution_error(entry)
    assert sorted(p.name for p in (server.base / "models" / "sara").iterdir()) == before
    assert "SaRATrain" in server.get("/object_info/SaRATrain")  # still serving


def test_cancel_stops_training_keeps_what_was_learned_and_leaves_no_partial_file(comfy) -> None:
    server, base = comfy
    graph = with_save(
        train_graph(steps=5000, learning_rate=1e-3, save_every=3, save_prefix="cancelled"), "cancelled_final"
    )
    folder = server.base / "models" / "sara"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(entry=server.run(graph, timeout=600)))
    runner.start()
    deadline = time.monotonic() + 300
    while not list(folder.glob("cancelled_00001_step*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", b"", method="POST"), timeout=30)
    runner.join(timeout=600)
    entry = result["entry"]
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    status = entry["outputs"]["train"]["sara_status"][0]
    assert status.startswith("cancelled: "), status
    steps_done = len(entry["outputs"]["train"]["sara_loss"])
    assert 3 <= steps_done < 5000
    assert not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    for path in folder.glob("cancelled_*.safetensors"):
        sara_train.SparseDelta.load(path)  # every file is complete
    final = sara_train.SparseDelta.load(saved_delta(server.base, "cancelled_final"))
    assert final.metadata["steps"] == str(steps_done)
    digits = len("5000")
    assert (folder / f"cancelled_00001_step{steps_done:0{digits}d}.safetensors").exists()
