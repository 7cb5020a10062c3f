"""SaRA on a real diffusers UNet2DConditionModel (small config, random weights): trains with
diffusers' own gradient checkpointing, and its delta reproduces the trained model on a fresh copy."""

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import sara_train


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def test_unet_trains_and_its_delta_reproduces_it(tmp_path: Path) -> None:
    unet = tiny_unet()
    pristine = copy.deepcopy(unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    timesteps = torch.tensor([10, 500])

    optimizer = sara_train.SaRAAdamW(unet, lr=3e-3, budget=0.05, rank_weight=1e-3, progressive_at=10)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert optimizer.handle.num_trainable < round(0.05 * optimizer.handle.num_targeted)

    unet.eval()
    with torch.no_grad():
        trained = unet(latents, timesteps, text).sample
    path = optimizer.handle.delta().save(tmp_path / "unet.safetensors", dtype=torch.float32)
    fresh = copy.deepcopy(pristine).eval()
    sara_train.SparseDelta.load(path).apply_to(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(latents, timesteps, text).sample, trained, rtol=1e-4, atol=1e-5)
