"""Random diffusion models that ComfyUI detects as each family it loads, built offline for the node
tests and benchmarks.

``write_model(family, path)`` writes one as ``.safetensors`` in ComfyUI's own key layout (the one
``UNETLoader`` reads from ``models/diffusion_models``). The keys and shapes come from ComfyUI's own
model class built on the ``meta`` device, so they always match the ComfyUI that is installed; the
values are seeded. Building imports ComfyUI, which changes process-wide state (CPU mode, logging),
so it runs in a subprocess: ``python -m tools.comfyui_models <family> <path> [--dtype ...]``.

What ComfyUI's detection fixes (``comfy/model_detection.py``), hence how small each family can be:

========== ============================ =================================================== ==========
family     detected as                  fixed by detection                                  size
========== ============================ =================================================== ==========
sd15       SD15 (UNet, eps)             everything read from shapes                         21 M
sd2        SD20 (UNet, v)               linear transformer projections, context 1024        21 M
sdxl       KOALA-700M (SDXL family)     transformer depths [0, 2, 5], label_emb             ~90 M
sd3        SD3 (MMDiT, flow)            width = 64 x depth = 64 x heads                     0.16 M
flux       Flux (dev, guidance)         width 3072, 24 heads, rope axes [16, 56, 56]        389 M
wan21      WAN21_T2V (flow, 5-D latent) heads = dim / 128, text width 4096                  0.9 M
qwen_image QwenImage (flow, 5-D latent) width 3072, text width 3584                         380 M
========== ============================ =================================================== ==========

Flux and Qwen-Image cannot be made narrow, so they are one block deep (Flux: one double block, no
single block). Values: the UNets keep ``N(0, 0.05)`` for every parameter; the transformers get
``N(0, 1/fan_in)`` matrices (variance preserving, so 3072-wide layers stay finite), norm scales
``1 + N(0, 0.02)`` and ``N(0, 0.02)`` for every other tensor. ``FAMILY_INPUTS`` says what each
family's model needs as conditioning and latents (``tools/comfyui_test_nodes`` makes them).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
STORAGE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}
"""How ``write_model`` may store tensors. (This module imports nothing of the project: the test
node loads it by path inside the ComfyUI server.)"""


@dataclass(frozen=True)
class FamilyInputs:
    """What a family's model consumes: text context ``[B, tokens, context_dim]``, a pooled vector
    ``[B, pooled_dim]`` (the ``pooled_output`` key is mandatory for SD3/Flux even when None), a
    guidance value (Flux) and whether latents are 5-D video latents ``[B, C, T, h, w]``."""

    context_dim: int
    latent_channels: int = 16
    pooled_dim: int | None = None
    guidance: float | None = None
    video: bool = False


FAMILY_INPUTS = {
    "sd15": FamilyInputs(context_dim=768, latent_channels=4),
    "sd2": FamilyInputs(context_dim=1024, latent_channels=4),
    "sdxl": FamilyInputs(context_dim=2048, latent_channels=4, pooled_dim=1280),
    "sd3": FamilyInputs(context_dim=32, pooled_dim=32),
    "flux": FamilyInputs(context_dim=32, pooled_dim=32, guidance=3.5),
    "wan21": FamilyInputs(context_dim=4096, video=True),
    "qwen_image": FamilyInputs(context_dim=3584, video=True),
}
"""The inputs of the models ``write_model`` builds, by family."""

UNET_OPTIONS = {
    "sd15": {
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [1, 1],
        "transformer_depth_middle": -1,
        "context_dim": 768,
        "use_linear_in_transformer": False,
    },
    "sd2": {
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [1, 1],
        "transformer_depth_middle": -1,
        "context_dim": 1024,
        "use_linear_in_transformer": True,
    },
    # ComfyUI matches SDXL-family UNets by their transformer depths; KOALA-700M's ([0, 2, 5]) is the
    # smallest, here at 320 channels on every level, with SDXL's pooled/size conditioning (label_emb).
    "sdxl": {
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 2, 5],
        "transformer_depth_output": [0] * 6,
        "transformer_depth_middle": -1,
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_classes": "sequential",
    },
}
"""``UNetModel`` options of the small UNets ComfyUI detects as SD1.5, SD2 and the SDXL family."""


def write_model(family: str, path: Path, dtype: str = "fp32", seed: int = 0) -> Path:
    """Write a random ``family`` model (``FAMILY_INPUTS``) in ComfyUI's layout to ``path``, its
    tensors stored as ``dtype`` (a ``STORAGE_DTYPES`` name). Runs in a subprocess; returns ``path``."""
    if family not in FAMILY_INPUTS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_INPUTS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tools.comfyui_models", family, str(path), "--dtype", dtype, "--seed", str(seed)]
    subprocess.run(command, cwd=REPO, check=True, timeout=900)
    return path


def _comfy_ops():
    """Import ComfyUI from ``tools.comfyui_server.comfyui_dir()`` in CPU mode; its no-init operations."""
    from tools.comfyui_server import comfyui_dir

    sys.path.insert(0, str(comfyui_dir()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU
    import comfy.ops

    return comfy.ops.disable_weight_init


def _transformer_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the smallest ``family`` transformer ComfyUI detects, from its own class on meta."""
    ops = _comfy_ops()
    inputs = FAMILY_INPUTS[family]
    if family == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

        width = 64  # one block, one head of 64: ComfyUI reads depth = heads = width / 64
        model = MMDiT(
            input_size=None,
            patch_size=2,
            in_channels=16,
            depth=1,
            adm_in_channels=inputs.pooled_dim,
            out_channels=16,
            context_embedder_config={
                "target": "torch.nn.Linear",
                "params": {"in_features": inputs.context_dim, "out_features": width},
            },
            num_patches=16 * 16,
            pos_embed_max_size=16,
            device="meta",
            operations=ops,
        )
    elif family == "flux":
        from comfy.ldm.flux.model import Flux

        model = Flux(
            in_channels=16,
            out_channels=16,
            vec_in_dim=inputs.pooled_dim,
            context_in_dim=inputs.context_dim,
            hidden_size=3072,
            mlp_ratio=4.0,
            num_heads=24,
            depth=1,
            depth_single_blocks=0,
            axes_dim=[16, 56, 56],
            theta=10000,
            patch_size=2,
            qkv_bias=True,
            guidance_embed=True,
            device="meta",
            operations=ops,
        )
    elif family == "wan21":
        from comfy.ldm.wan.model import WanModel

        model = WanModel(
            model_type="t2v",
            patch_size=(1, 2, 2),
            in_dim=16,
            dim=128,
            ffn_dim=256,
            freq_dim=256,
            text_dim=inputs.context_dim,
            out_dim=16,
            num_heads=1,
            num_layers=1,
            qk_norm=True,
            cross_attn_norm=True,
            eps=1e-6,
            device="meta",
            operations=ops,
        )
    elif family == "qwen_image":
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(
            in_channels=64, out_channels=16, num_layers=1, device="meta", operations=ops
        )
    else:
        raise ValueError(f"{family!r} is not a transformer family")
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def random_transformer_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 tensors for ``shapes`` (keys in sorted order from one generator): matrices and
    kernels ``N(0, 1/fan_in)``, 1-D norm scales ``1 + N(0, 0.02)``, everything else ``N(0, 0.02)``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        tensor = torch.empty(shape)
        if len(shape) >= 2 and key.endswith(".weight"):
            tensor.normal_(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), generator=generator)
        elif len(shape) == 1 and ("norm" in key or key.endswith(".scale")):
            tensor.normal_(0.0, 0.02, generator=generator).add_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[key] = tensor
    return state


def _unet_state(family: str, seed: int) -> dict[str, torch.Tensor]:
    _comfy_ops()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        num_head_channels=64,
        use_spatial_transformer=True,
        dtype=torch.float32,
        **UNET_OPTIONS[family],
    )
    with torch.no_grad():  # comfy.ops skips weight init: give the random model real values
        for param in unet.parameters():
            param.normal_(0.0, 0.05)
    return unet.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=list(FAMILY_INPUTS))
    parser.add_argument("path", type=Path)
    parser.add_argument("--dtype", default="fp32", choices=list(STORAGE_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from safetensors.torch import save_file

    if args.family in UNET_OPTIONS:
        state = _unet_state(args.family, args.seed)
    else:
        state = random_transformer_state(_transformer_shapes(args.family), args.seed)
    dtype = STORAGE_DTYPES[args.dtype]
    save_file({key: value.to(dtype).contiguous() for key, value in state.items()}, str(args.path))


if __name__ == "__main__":
    main()
