"""Which model family a delta was trained for: from what its trainer recorded, else from its keys
and shapes. Used where another tool wants the family named (the webuis' Lora tab metadata).

Family names: ``sd1``, ``sd2``, ``sdxl`` (Stable Diffusion UNets), ``sd3``, ``flux``, and, only from
recorded metadata, the other ComfyUI families (``wan``, ``qwen_image``, ...).
"""

from __future__ import annotations

import re

from ..engine.delta import SparseDelta
from .sd_unet import strip_ldm_prefix, unet_key_naming

COMFYUI_MODEL_TYPES = {
    "SD15": "sd1",
    "SD15_instructpix2pix": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SDXLRefiner": "sdxl",
    "SDXL_instructpix2pix": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
    "SD3": "sd3",
    "Flux": "flux",
    "FluxSchnell": "flux",
    "WAN21_T2V": "wan",
    "WAN21_I2V": "wan",
    "WAN22_T2V": "wan",
    "QwenImage": "qwen_image",
}
"""ComfyUI's model config class names (``SaRA Train`` records one as ``base_model_type``) -> family."""

CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
"""Text-embedding width of the Stable Diffusion UNets' cross-attention (``attn2.to_k`` inputs)."""


def bare_key(key: str) -> str:
    """``key`` without a checkpoint / ComfyUI prefix (``model.diffusion_model.``, ``diffusion_model.``)
    or a diffusers pipeline's ``transformer.``."""
    return strip_ldm_prefix(key.removeprefix("transformer."))


def delta_family(delta: SparseDelta) -> str | None:
    """The family ``delta`` is for, or None when nothing tells.

    In order: the ``base_kind`` the ``sara-train`` CLI records (``sd1``/``sd2``/``sdxl``); the
    ``base_model_type`` the ComfyUI node records (``COMFYUI_MODEL_TYPES``; a type not in it gives
    None); else the keys: Flux's
    ``double_blocks`` (diffusers: ``single_transformer_blocks``), SD3's ``joint_blocks``; for a
    Stable Diffusion UNet (original or diffusers names) SDXL's ``label_emb``/``add_embedding``,
    else the cross-attention width (``CROSS_ATTENTION_WIDTHS``), else linear transformer
    projections (SD2) or 1x1 convolutions (SD1).
    """
    if "base_kind" in delta.metadata:
        return delta.metadata["base_kind"]
    if "base_model_type" in delta.metadata:  # a ComfyUI model type this table does not know: no guessing
        return COMFYUI_MODEL_TYPES.get(delta.metadata["base_model_type"])
    bare = {bare_key(key): layer.shape for key, layer in delta.layers.items()}
    if any(key.startswith(("double_blocks.", "single_transformer_blocks.")) for key in bare):
        return "flux"
    if any(key.startswith("joint_blocks.") for key in bare):
        return "sd3"
    if unet_key_naming(bare) is None:
        return None
    if any(key.startswith(("label_emb.", "add_embedding.")) for key in bare):
        return "sdxl"
    widths = {shape[1] for key, shape in bare.items() if re.search(r"attn2\.to_k\.weight$", key) and len(shape) == 2}
    if len(widths) == 1 and (family := CROSS_ATTENTION_WIDTHS.get(widths.pop())):
        return family
    projections = [shape for key, shape in bare.items() if key.endswith(".proj_in.weight")]
    if projections:
        return "sd2" if all(len(shape) == 2 for shape in projections) else "sd1"
    return None
