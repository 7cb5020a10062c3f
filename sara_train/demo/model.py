"""``GlyphModel``: the demo's small text-to-glyph diffusion model, its files, sampling and grids.

A glyph model is a diffusers ``UNet2DConditionModel`` working directly on 32x32 one-channel pixels
in [-1, 1] (no VAE), the word-level ``TextEncoder`` it cross-attends to, a ``DDPMScheduler`` that
defines the training noise (v-prediction, cosine schedule) and a ``DDIMScheduler`` sampler with
classifier-free guidance against the empty prompt ``""``.

Folder layout (``save_glyph_model`` / ``load_glyph_model``):
  ``config.json``                 {"format": "sara-glyph-model", "unet": diffusers UNet config,
                                   "noise_scheduler": DDPM config, "sampler": {"steps", "guidance"},
                                   "provenance": how the weights were made}
  ``unet.safetensors``            UNet weights (float16)
  ``text_encoder.safetensors``    text encoder weights (float32); ``text_encoder.json`` its config
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..engine.errors import SaRAError
from ..engine.files import atomic_output, read_safetensors_header
from .glyphs import GLYPH_SIZE, PRETRAINING_FONTS
from .text import TextEncoder, TextEncoderConfig, glyph_vocabulary, load_text_encoder, save_text_encoder

FORMAT_NAME = "sara-glyph-model"
BASE_FOLDER = Path(__file__).parent / "base"
"""The committed pretrained base, made by ``tools/pretrain_glyph_base.py`` (its ``config.json``
records the command, run when the script lived in ``scripts/``)."""
CONFIG_FILE = "config.json"
UNET_FILE = "unet.safetensors"
UNET_CONFIG: dict = {
    "sample_size": GLYPH_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "attention_head_dim": 32,
}
"""UNet of a new glyph model (plus ``cross_attention_dim`` = text width): 32 -> 16 -> 8 pixels,
cross-attention at 16 and 8."""
NOISE_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}
DEFAULT_SAMPLER: dict = {"steps": 30, "guidance": 1.0}
"""Measured on the base: 30 (even 15) DDIM steps without guidance recognise 62/62 characters;
guidance 1.5 does too at twice the cost, and 2.0 or more degrades the glyphs."""


@dataclass
class GlyphModel:
    """The pieces of a glyph model. ``unet`` and ``text_encoder`` are plain modules (train them,
    inject SaRA into ``unet``); ``noise_scheduler`` adds training noise; ``sampler`` denoises;
    ``sampler_defaults`` = {"steps", "guidance"} for ``generate``; ``provenance`` says how the
    weights were made (free-form JSON)."""

    unet: UNet2DConditionModel
    text_encoder: TextEncoder
    noise_scheduler: DDPMScheduler
    sampler: DDIMScheduler
    sampler_defaults: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLER))
    provenance: dict = field(default_factory=dict)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text hidden states [len(prompts), L, D] (float32, on the text encoder's device)."""
        return self.text_encoder.encode(prompts)

    def to(self, device: torch.device | str) -> GlyphModel:
        """Move both modules to ``device`` (in place); returns ``self``."""
        self.unet.to(device)
        self.text_encoder.to(device)
        return self


def sampler_for(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """The DDIM sampler for ``noise_scheduler``'s noise: trailing timesteps (the first step starts
    from pure noise at t=999), deterministic (eta 0)."""
    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False)


def new_glyph_model(seed: int = 0) -> GlyphModel:
    """A randomly initialised glyph model (``UNET_CONFIG``, a ``TextEncoder`` over
    ``glyph_vocabulary()``); the same seed gives the same weights."""
    torch.manual_seed(seed)
    text_encoder = TextEncoder(TextEncoderConfig(tuple(glyph_vocabulary())))
    unet = UNet2DConditionModel(**UNET_CONFIG, cross_attention_dim=text_encoder.config.width)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULER_CONFIG)
    return GlyphModel(unet, text_encoder, noise_scheduler, sampler_for(noise_scheduler))


def save_glyph_model(model: GlyphModel, folder: str | Path) -> None:
    """Write ``model`` into ``folder`` (layout in the module docstring), each file atomically.
    The UNet is stored as float16, the text encoder as float32. Raises ``SaRAError`` if SaRA is
    still injected into ``model.unet`` (merge it first: ``handle.remove()``)."""
    folder = Path(folder)
    if any(".parametrizations." in key for key in model.unet.state_dict()):
        raise SaRAError(
            f"cannot save a glyph model into {folder} while SaRA is injected into its UNet; call handle.remove() first"
        )
    unet_state = {
        key: value.detach().to(torch.float16).cpu().contiguous() for key, value in model.unet.state_dict().items()
    }
    with atomic_output(folder / UNET_FILE) as temp:
        temp.write_bytes(save(unet_state, metadata={"format": FORMAT_NAME}))
    save_text_encoder(model.text_encoder, folder)
    config = {
        "format": FORMAT_NAME,
        "unet": {key: value for key, value in dict(model.unet.config).items() if not key.startswith("_")},
        "noise_scheduler": {
            key: value for key, value in dict(model.noise_scheduler.config).items() if not key.startswith("_")
        },
        "sampler": model.sampler_defaults,
        "provenance": model.provenance,
    }
    with atomic_output(folder / CONFIG_FILE) as temp:
        temp.write_text(json.dumps(config, indent=1, default=list) + "\n")


def load_glyph_model(folder: str | Path = BASE_FOLDER) -> GlyphModel:
    """The glyph model saved in ``folder`` (default: the committed base), float32 on the CPU, in
    eval mode. Raises ``SaRAError`` naming the file if one is missing, malformed, or does not fit."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise SaRAError(f"{config_path}: no such file; is {folder} a glyph model folder?") from None
    except json.JSONDecodeError as exc:
        raise SaRAError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise SaRAError(f'{config_path}: expected "format": "{FORMAT_NAME}"')
    try:
        unet = UNet2DConditionModel.from_config(config["unet"])
        noise_scheduler = DDPMScheduler.from_config(config["noise_scheduler"])
        sampler_defaults = {"steps": int(config["sampler"]["steps"]), "guidance": float(config["sampler"]["guidance"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise SaRAError(f"{config_path}: malformed glyph model config ({type(exc).__name__}: {exc})") from None
    unet_path = folder / UNET_FILE
    read_safetensors_header(unet_path)
    try:
        unet.load_state_dict(load_file(str(unet_path)))
    except (RuntimeError, SafetensorError) as exc:
        raise SaRAError(f"{unet_path} does not fit the UNet config in {config_path}: {exc}") from None
    return GlyphModel(
        unet.float().eval(),
        load_text_encoder(folder),
        noise_scheduler,
        sampler_for(noise_scheduler),
        sampler_defaults,
        dict(config.get("provenance", {})),
    )


@torch.no_grad()
def generate(
    model: GlyphModel, prompts: Sequence[str], seed: int = 0, steps: int | None = None, guidance: float | None = None
) -> torch.Tensor:
    """Sample one glyph per prompt: float32 [len(prompts), 1, 32, 32] in [-1, 1], on the CPU.

    DDIM with ``steps`` steps and classifier-free guidance ``guidance`` (1.0 = none) against the
    empty prompt; defaults from ``model.sampler_defaults``. The starting noise comes from a CPU
    generator seeded with ``seed``, so a prompt's glyph depends on its position in the batch, and the
    same call gives the same glyphs on the same device. Runs on the UNet's device; the modules'
    train/eval mode is left as it is.
    """
    steps = steps or model.sampler_defaults["steps"]
    guidance = model.sampler_defaults["guidance"] if guidance is None else guidance
    device = next(model.unet.parameters()).device
    text = model.encode_prompts(list(prompts)).to(device)
    if guidance != 1.0:
        empty = model.encode_prompts([""]).to(device).expand(len(prompts), -1, -1)
        text = torch.cat([text, empty])
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(len(prompts), 1, GLYPH_SIZE, GLYPH_SIZE, generator=generator).to(device)
    sampler = DDIMScheduler.from_config(model.sampler.config)
    sampler.set_timesteps(steps)
    for timestep in sampler.timesteps:
        batch = torch.cat([sample, sample]) if guidance != 1.0 else sample
        prediction = model.unet(batch, timestep.to(device), text).sample
        if guidance != 1.0:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        sample = sampler.step(prediction, timestep, sample, eta=0.0).prev_sample
    return sample.clamp(-1, 1).float().cpu()


def glyph_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    labels: Sequence[str],
    column_labels: Sequence[str] | None = None,
    scale: int = 3,
) -> Image.Image:
    """A labelled grid image: row ``i`` is ``labels[i]`` then the glyphs ``rows[i]`` (each
    [1, 32, 32] in [-1, 1]), drawn as dark ink on white paper, each glyph enlarged ``scale`` times.
    ``column_labels`` (optional) head the columns. Rows may have different lengths."""
    if len(rows) != len(labels):
        raise SaRAError(f"glyph_grid: {len(rows)} rows but {len(labels)} labels")
    cell = GLYPH_SIZE * scale
    font = ImageFont.truetype(str(PRETRAINING_FONTS[0].path), 14)
    label_width = 12 + max((int(font.getlength(label)) for label in labels), default=0)
    header = 22 if column_labels else 0
    columns = max((len(row) for row in rows), default=0)
    image = Image.new("L", (label_width + columns * (cell + 2), header + len(rows) * (cell + 2)), 255)
    draw = ImageDraw.Draw(image)
    for column, text in enumerate(column_labels or []):
        draw.text((label_width + column * (cell + 2) + cell // 2, header // 2), text, fill=0, font=font, anchor="mm")
    for row_index, (row, label) in enumerate(zip(rows, labels)):
        top = header + row_index * (cell + 2)
        draw.text((6, top + cell // 2), label, fill=0, font=font, anchor="lm")
        for column, glyph in enumerate(row):
            paper = ((1 - glyph.detach().float().cpu().clamp(-1, 1)[0]) * 127.5).round().to(torch.uint8)
            tile = Image.fromarray(paper.numpy()).resize((cell, cell), Image.Resampling.NEAREST)
            image.paste(tile, (label_width + column * (cell + 2), top))
    return image.convert("RGB")
