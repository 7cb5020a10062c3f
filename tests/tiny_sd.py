"""Tiny Stable Diffusion pipelines built locally from small configs (no downloads).

``write_tiny_sd_pipeline(folder, kind)`` writes a complete diffusers folder (``model_index.json``,
unet, vae, text encoder(s), tokenizer(s), scheduler) with random weights, loadable by
``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusionXLPipeline.from_pretrained``.
The CLIP tokenizer has a tiny byte-level BPE vocabulary written here (letters, digits, a few marks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32
VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"


def write_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose BPE vocabulary is single characters plus their word-final forms."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = list(VOCAB_CHARS) + [char + "</w>" for char in VOCAB_CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_unet(kind: str = "sd15") -> UNet2DConditionModel:
    """A two-level UNet2DConditionModel in the layout of ``kind`` ("sd15", "sd2" or "sdxl")."""
    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "norm_num_groups": 8,
    }
    if kind == "sd15":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=8,
        )
    if kind == "sd2":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_WIDTH,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8,
        )
    raise ValueError(f"unknown kind {kind!r}: expected sd15, sd2 or sdxl")


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_text_config(projection: bool = False) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=2 * len(VOCAB_CHARS) + 2,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=TEXT_WIDTH,
        bos_token_id=2 * len(VOCAB_CHARS),
        eos_token_id=2 * len(VOCAB_CHARS) + 1,
        pad_token_id=2 * len(VOCAB_CHARS) + 1,
    )


def write_tiny_sd_pipeline(folder: Path, kind: str = "sd15", seed: int = 0) -> Path:
    """Write a random tiny pipeline of ``kind`` to ``folder`` (diffusers layout); returns ``folder``.

    The two-level VAE downsamples by 2: a 32x32 image gives 4x16x16 latents.
    """
    torch.manual_seed(seed)
    folder = Path(folder)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    if kind == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=CLIPTextModel(tiny_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection=True)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=tiny_unet(kind),
            scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=CLIPTextModel(tiny_text_config()),
            tokenizer=tokenizer,
            unet=tiny_unet(kind),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    for path in (folder / "_tokenizer_src").iterdir():
        path.unlink()
    (folder / "_tokenizer_src").rmdir()
    return folder
