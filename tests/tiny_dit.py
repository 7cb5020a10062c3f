"""Tiny flow-matching DiT pipelines built locally from small configs (no downloads).

``write_tiny_sd3_pipeline(folder)`` and ``write_tiny_flux_pipeline(folder)`` write complete diffusers
folders (``StableDiffusion3Pipeline``: transformer, VAE, two CLIP encoders and T5; ``FluxPipeline``:
transformer, VAE, CLIP and T5) with random weights. The CLIP tokenizers are ``tiny_sd``'s; the T5
tokenizer is a unigram vocabulary of single characters written here. The VAE has 16 latent channels
and downsamples by 2: a 32x32 image gives 16x16x16 latents (Flux packs them into 8x8 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file, save_file
from tiny_sd import TEXT_WIDTH, VOCAB_CHARS, tiny_text_config, write_tiny_tokenizer
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from sara_train.families.block_naming import BlockNaming

T5_WIDTH = 48


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer over single characters (pad, eos and unk first, as T5 numbers them)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(char, -2.0) for char in VOCAB_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=4 + len(VOCAB_CHARS),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_flow_vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def write_tiny_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """A random tiny SD3.5-style pipeline (MMDiT with a dual-attention block and q/k norms) in ``folder``."""
    torch.manual_seed(seed)
    folder = Path(folder)
    clip_tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=32,
            pooled_projection_dim=2 * TEXT_WIDTH,
            out_channels=16,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(projection=True)),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection=True)),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5(),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_flux_pipeline(folder: Path, seed: int = 0, guidance: bool = True) -> Path:
    """A random tiny Flux.1-style pipeline in ``folder``: dev-like (guidance embedding) by default,
    schnell-like with ``guidance=False``."""
    torch.manual_seed(seed)
    folder = Path(folder)
    pipeline = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=guidance,
            axes_dims_rope=(4, 6, 6),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(tiny_text_config()),
        tokenizer=write_tiny_tokenizer(folder / "_tokenizer_src"),
        text_encoder_2=tiny_t5(),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def write_original_transformer_file(pipeline_folder: Path, naming: BlockNaming, out_path: Path) -> Path:
    """The pipeline's transformer as a single ``.safetensors`` file in the original naming (as Black
    Forest Labs and Stability release them), its tensors assembled through ``naming``'s table."""
    diffusers_state = load_file(Path(pipeline_folder) / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(original_state(naming, diffusers_state), out_path)
    return out_path


def original_state(naming: BlockNaming, diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``diffusers_state`` (a transformer's tensors) in the original naming, fused tensors assembled."""
    original = naming.original_shapes({key: tuple(value.shape) for key, value in diffusers_state.items()})
    state = {key: torch.empty(shape) for key, shape in original.items()}
    for key, pieces in naming.table(original).items():
        for piece in pieces:
            rows = diffusers_state[piece.key][piece.target_row : piece.target_row + piece.stop - piece.start]
            state[key][piece.start : piece.stop] = rows
    return state
