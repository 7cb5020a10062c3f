"""Shared small models for the engine tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv2d -> GroupNorm -> Linear stack: exercises conv, norm and linear targets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        h = h.mean(dim=(2, 3))
        return self.head(torch.nn.functional.gelu(self.proj(h)))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 5, 5, generator=generator), torch.randn(6, 4, generator=generator)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny SD1.5 diffusers pipeline folder (``tiny_sd``)."""
    from tiny_sd import write_tiny_sd_pipeline

    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("base") / "sd15", "sd15")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Four captioned PNGs (``train_cli.write_image_folder``); tests must not change it."""
    from train_cli import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("data") / "discs")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI with tiny models: ``(server, base UNet state dict)``.

    models/unet/tiny.safetensors (the SD1.5-detected tiny UNet), models/checkpoints/tiny_ckpt
    (that UNet alone under model.diffusion_model.) and tiny_full (with random CLIP-L and SD VAE),
    models/sara: deltas a/b, one for another model, a truncated one and a pickle;
    models/loras/tiny_lora; input/train_*.png: four 64x64 training images.
    """
    import pickle

    from safetensors.torch import load_file, save_file

    from tools.comfyui_models import write_model
    from tools.comfyui_server import (
        ComfyUIServer,
        make_delta,
        make_lora,
        write_tiny_sd15_checkpoint,
        write_training_images,
    )

    base_dir = tmp_path_factory.mktemp("comfyui")
    unet_path = write_model("sd15", base_dir / "models" / "unet" / "tiny.safetensors")
    base = load_file(str(unet_path))
    sara_dir = base_dir / "models" / "sara"
    sara_dir.mkdir(parents=True)
    make_delta(base, 1, 0.05).save(sara_dir / "a.safetensors")
    make_delta(base, 2, 0.02).save(sara_dir / "b.safetensors")
    other = {"other.weight": torch.randn(8, 8), "other2.weight": torch.randn(4, 8)}
    make_delta(other, 3, 0.5).save(sara_dir / "other_model.safetensors")
    data = (sara_dir / "a.safetensors").read_bytes()
    (sara_dir / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (sara_dir / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    checkpoint = {"model.diffusion_model." + k: v for k, v in base.items()}
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    (base_dir / "models" / "checkpoints").mkdir(parents=True)
    save_file(checkpoint, str(base_dir / "models" / "checkpoints" / "tiny_ckpt.safetensors"))
    write_tiny_sd15_checkpoint(unet_path, base_dir / "models" / "checkpoints" / "tiny_full.safetensors")
    (base_dir / "models" / "loras").mkdir(parents=True)
    save_file(make_lora(base), str(base_dir / "models" / "loras" / "tiny_lora.safetensors"))
    write_training_images(base_dir / "input")
    server = ComfyUIServer(base_dir)
    yield server, base
    server.stop()
