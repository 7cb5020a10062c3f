"""A model ComfyUI loads with ``weight_dtype fp8_e4m3fn`` (the 24 GB-card way to run big models) trains
with SaRA Train: the stored fp8 weights are never written (the overlay mode keeps the update and its
gradient in the compute dtype), the loss goes down, and SaRA Load of the saved delta onto the same fp8
model samples exactly like the Train output. SaRA Load itself patches fp8 weights the way ComfyUI
patches LoRAs (in fp32, then rounded back to fp8): the rounding error is measured here."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sara_train
from tools.comfyui_graphs import (
    output_file,
    saved_delta,
    train_graph,
    unet_of,
    with_model_save,
    with_sampling,
    with_save,
)


def fp8(graph: dict) -> dict:
    """``graph`` with SaRA Train's model loaded from the same UNet file as fp8 (prompt and latents
    still from the checkpoint's CLIP and VAE)."""
    graph["unet"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "fp8_e4m3fn"},
    }
    graph["train"]["inputs"]["model"] = ["unet", 0]
    return graph


@pytest.fixture(scope="module")
def fp8_run(comfy):
    server, _ = comfy
    graph = with_model_save(
        fp8(with_save(train_graph(steps=16, training_dtype="fp32"), "fp8_run")), ["unet", 0], "fp8_base_after"
    )
    with_sampling(graph, ["train", 0], "fp8_trained")
    entry = server.run_ok(graph)
    untrained = server.run_ok(fp8(train_graph(steps=16, training_dtype="fp32", learning_rate=1e-8)))
    return entry, untrained, sara_train.SparseDelta.load(saved_delta(server.base, "fp8_run"))


def test_fp8_training_learns_and_never_writes_the_stored_weights(comfy, fp8_run) -> None:
    server, base = comfy
    entry, untrained, delta = fp8_run
    losses, reference = entry["outputs"]["train"]["sara_loss"], untrained["outputs"]["train"]["sara_loss"]
    assert losses[0] == pytest.approx(reference[0], rel=1e-6)
    second_half = [a / b for a, b in zip(losses[8:], reference[8:], strict=True)]
    assert sum(second_half) / len(second_half) < 0.99, second_half
    after = unet_of(load_file(output_file(server, "diffusion_models", "fp8_base_after")))
    for key, tensor in base.items():  # the cached fp8 model is the file rounded to fp8, untouched
        assert torch.equal(after[key].view(torch.uint8), tensor.to(torch.float8_e4m3fn).view(torch.uint8)), key
    values = torch.cat([layer.values for layer in delta.layers.values()])
    assert (values != 0).float().mean() > 0.5  # the updates were kept, not rounded away


def test_loading_the_saved_delta_on_the_fp8_model_samples_like_the_train_output(comfy, fp8_run) -> None:
    server, _ = comfy
    graph = fp8(train_graph(steps=1))
    graph = {key: graph[key] for key in ("ckpt", "pos", "unet")}
    graph["loader"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["unet", 0], "strength": 1.0, "delta_name": saved_delta(server.base, "fp8_run").name},
    }
    with_sampling(graph, ["loader", 0], "fp8_loaded")
    with_sampling(graph, ["unet", 0], "fp8_untouched")
    server.run_ok(graph)
    latent = {
        name: load_file(output_file(server, "latents", name))["latent_tensor"]
        for name in ("fp8_trained", "fp8_loaded", "fp8_untouched")
    }
    assert torch.equal(latent["fp8_trained"], latent["fp8_loaded"])
    assert not torch.allclose(latent["fp8_trained"], latent["fp8_untouched"], atol=1e-4)


def test_sara_load_rounds_an_fp8_patch_like_comfyui_rounds_loras(comfy, fp8_run) -> None:
    """ComfyUI adds the delta in fp32 and stochastically rounds the result back to fp8. Measured: how
    far the patched fp8 weights are from the exact base + delta at the touched entries."""
    server, base = comfy
    _, _, delta = fp8_run
    graph = fp8(train_graph(steps=1))
    graph = {"unet": graph["unet"]}
    graph["loader"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["unet", 0], "strength": 1.0, "delta_name": saved_delta(server.base, "fp8_run").name},
    }
    with_model_save(graph, ["loader", 0], "fp8_patched")
    server.run_ok(graph)
    patched = unet_of(load_file(output_file(server, "diffusion_models", "fp8_patched")))
    errors, sizes, moved = [], [], 0
    for key, layer in delta.layers.items():
        index = layer.flat_indices.long()
        exact = base[key].to(torch.float8_e4m3fn).float().reshape(-1)[index] + layer.values.float()
        got = patched[key].float().reshape(-1)[index]
        errors.append((got - exact).abs())
        sizes.append(layer.values.float().abs())
        moved += int((got != base[key].to(torch.float8_e4m3fn).float().reshape(-1)[index]).sum())
    error, size = torch.cat(errors), torch.cat(sizes)
    print(
        f"fp8 SaRA Load: mean |error| {error.mean():.3g} vs mean |delta| {size.mean():.3g}; "
        f"{moved / error.numel():.1%} of the touched entries changed their fp8 value"
    )
    assert patched[next(iter(delta.layers))].dtype == torch.float8_e4m3fn
    # fp8 keeps 3 mantissa bits: stochastic rounding of base + delta is off by under one step (1/8 relative)
    assert error.mean() < 0.15 * size.mean()
