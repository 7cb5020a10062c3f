"""Write a diffusers Stable Diffusion folder as an original-layout ("LDM") single-file checkpoint.

``write_single_file_checkpoint(folder, out_path)`` turns a tiny pipeline from ``tiny_sd`` into the
``.safetensors`` layout that ``StableDiffusionPipeline.from_single_file`` and ComfyUI read:
UNet under ``model.diffusion_model.`` (names from ``sara_train.families.sd_unet``), VAE under
``first_stage_model.`` (LDM VAE names; attention projections as 1x1 convolutions), CLIP text
encoder under ``cond_stage_model.transformer.text_model.``. SD1.x layout only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sara_train.families.sd_unet import diffusers_to_ldm_unet_keys

VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def write_single_file_checkpoint(pipeline_folder: Path, out_path: Path) -> Path:
    """Write ``out_path`` (safetensors, fp32) holding the SD1.x pipeline at ``pipeline_folder``."""
    folder = Path(pipeline_folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    if model_index["_class_name"] != "StableDiffusionPipeline" or "text_encoder_2" in model_index:
        raise ValueError(f"{folder}: only SD1.x pipelines (StableDiffusionPipeline) are supported")
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    text_encoder = load_file(folder / "text_encoder" / "model.safetensors")
    checkpoint = {
        f"model.diffusion_model.{ldm}": unet[key] for key, ldm in diffusers_to_ldm_unet_keys(unet, unet_config).items()
    }
    checkpoint.update(
        {
            f"first_stage_model.{vae_key_to_ldm(key, len(vae_config['up_block_types']))}": vae_tensor_to_ldm(
                key, tensor
            )
            for key, tensor in vae.items()
        }
    )
    checkpoint.update(
        {
            "cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): tensor
            for key, tensor in text_encoder.items()
        }
    )
    save_file({key: tensor.contiguous() for key, tensor in checkpoint.items()}, str(out_path))
    return Path(out_path)


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """The LDM name of a diffusers ``AutoencoderKL`` key (decoder up blocks are numbered in reverse)."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.",
        lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.block.",
        key,
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.",
        key,
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    key = key.replace(".conv_norm_out.", ".norm_out.")
    for diffusers_part, ldm_part in VAE_RESNET_PARTS.items():
        key = key.replace(f".{diffusers_part}.", f".{ldm_part}.")
    if ".mid.attn_1." in key:
        for diffusers_part, ldm_part in VAE_ATTENTION_PARTS.items():
            key = key.replace(f".attn_1.{diffusers_part}.", f".attn_1.{ldm_part}.")
    return key


def vae_tensor_to_ldm(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if ".mid_block.attentions.0.to_" in key and key.endswith(".weight"):
        return tensor[:, :, None, None]
    return tensor
