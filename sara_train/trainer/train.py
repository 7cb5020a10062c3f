"""``sara-train train``: a base model + an image folder -> a SaRA delta, end to end.

Load the base (a Stable Diffusion 1.x/2.x/XL, SD3/3.5 or Flux.1 diffusers folder or single file),
scan and check the dataset, encode it once (cached on disk), then ``run_training`` on the UNet or
transformer with the family's objective. VAE and text encoders stay frozen; they are needed again
only to render validation images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..engine.apply import fit_delta
from ..engine.delta import SparseDelta
from ..engine.errors import SaRAError
from ..families import flux, sd3
from ..families.sd_unet import delta_to_ldm_keys
from .base_model import BaseModel, load_base
from .cache import build_examples, data_fingerprint, file_sha256
from .config import TrainConfig, parse_device
from .data import DatasetItem, scan_dataset
from .interrupts import Interrupted, StopSignals
from .loop import (
    Distributed,
    RunFolder,
    TrainResult,
    check_run_folder,
    data_changed_message,
    run_training,
    saved_data_fingerprint,
)
from .types import TrainingExample


def pick_device(config: TrainConfig) -> torch.device:
    """``config.device``, where ``auto`` is this process's GPU (LOCAL_RANK under a launcher) or the CPU."""
    device = parse_device(config.device)
    if device is not None:
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def start_processes(device: torch.device) -> Distributed:
    """Join the process group when launched by ``accelerate launch`` or ``torchrun`` (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sara-train"


def train(config: TrainConfig) -> TrainResult:
    """Run ``config`` (see ``TrainConfig``); returns the result after writing the run folder.

    Options, the output folder and the dataset are checked before the model is loaded. SIGINT or
    SIGTERM before training starts returns a result with ``interruption`` set and nothing saved;
    during training ``run_training`` saves the last completed step.
    """
    config.validate()
    device = pick_device(config)
    folder = RunFolder(Path(config.output_dir))
    if Path(config.data).resolve() == folder.root.resolve():
        raise SaRAError(
            f"--output-dir {config.output_dir} is the --data folder: the run's images (loss plot, "
            f"samples) would become training images; choose another folder"
        )
    check_run_folder(folder, config.resume)
    doing = "starting"
    with StopSignals():
        try:
            distributed = start_processes(device)
            doing = "reading the training data"
            items = scan_dataset(
                Path(config.data), caption_prefix=config.caption_prefix, caption_extension=config.caption_extension
            )
            image_hashes = [file_sha256(item.image_path) for item in items]
            fingerprint = data_fingerprint(items, image_hashes)
            held_out = held_out_positions(len(items), config.validation_split, config.seed)
            if config.resume and saved_data_fingerprint(folder) not in (None, fingerprint):
                raise SaRAError(data_changed_message(folder, f"training data in {config.data}"))
            doing = "loading the base model"
            base = load_base(  # bf16 training loads in bf16 (half the memory); fp16 text encoders overflow
                config.base,
                config_dir=config.base_config,
                dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32,
                device=device,
                text_tokens=config.text_tokens,
            )
            objective = base.objective(
                config.snr_gamma,
                config.timestep_sampling,
                config.logit_mean,
                config.logit_std,
                config.mode_scale,
                config.flow_shift,
                config.guidance,
            )
            doing = "encoding the training images"
            kept = [i for i in range(len(items)) if i not in held_out]
            examples = encode_examples(
                config, [items[i] for i in kept], [image_hashes[i] for i in kept], base, device, distributed
            )
            validation_examples = (
                encode_examples(
                    config,
                    [items[i] for i in held_out],
                    [image_hashes[i] for i in held_out],
                    base,
                    device,
                    distributed,
                )
                if held_out
                else []
            )
            empty_prompt = None
            if config.caption_dropout:
                with torch.no_grad():
                    empty_prompt = base.encode_prompts([""])[0]
            doing = "preparing the model"
            render = sample_renderer(base, config, device) if config.sample_prompts else None
            if render is None:
                base.vae.to("cpu")
                for encoder in base.text_encoders:
                    encoder.to("cpu")
        except Interrupted as stop:
            return TrainResult(None, [], None, interruption=stop, stopped_while=doing)
        metadata = {
            "base": str(base.source),
            "base_kind": base.kind,
            "images": str(len(items) - len(held_out)),
            "validation_images": str(len(held_out)),
            "examples": str(len(examples)),
            "key_format": config.key_format,
        }
        return run_training(
            base.denoiser,
            objective,
            examples,
            config,
            render_samples=render,
            delta_metadata=metadata,
            convert_delta=key_converter(base, config),
            data_fingerprint=fingerprint,
            empty_prompt=empty_prompt,
            validation_examples=validation_examples,
        )


def held_out_positions(count: int, fraction: float, seed: int) -> list[int]:
    """Sorted positions of the ``round(fraction * count)`` images held out for validation (a seeded
    choice); none for ``fraction`` 0. ``SaRAError`` when that leaves no image to train on or
    holds none out."""
    if not fraction:
        return []
    held = round(fraction * count)
    if not 1 <= held < count:
        raise SaRAError(
            f"--validation-split {fraction} of {count} images holds out {held}: need at least one image to "
            f"validate on and one to train on"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) for i in order[:held])


def encode_examples(
    config: TrainConfig,
    items: list[DatasetItem],
    image_hashes: list[str],
    base: BaseModel,
    device: torch.device,
    distributed: Distributed,
) -> list[TrainingExample]:
    """The training examples, from the cache or encoded (by the main process first, so the others
    read its cache files)."""
    encode_dtype = config.compute_dtype if device.type == "cuda" else torch.float32
    cache_dir = None if not config.cache else Path(config.cache_dir) if config.cache_dir else default_cache_dir()

    def encode() -> list[TrainingExample]:
        with torch.autocast(device.type, dtype=encode_dtype, enabled=encode_dtype != torch.float32):
            return build_examples(
                items,
                resolution=config.resolution,
                crop=config.crop,
                flip=config.flip,
                random_crop_variants=config.random_crop_variants,
                encode_images=base.encode_images,
                encode_prompts=base.encode_prompts,
                model_fingerprint=base.fingerprint,
                cache_dir=cache_dir,
                seed=config.seed,
                with_time_ids=base.kind == "sdxl",
                progress=distributed.is_main,
                image_hashes=image_hashes,
                bucket_step=config.bucket_step,
            )

    if distributed.is_main:
        examples = encode()
        distributed.barrier()
    else:
        distributed.barrier()
        examples = encode()
    return examples


def key_converter(base: BaseModel, config: TrainConfig) -> Callable[[SparseDelta], SparseDelta] | None:
    """Delta renaming to the original naming (``key_format`` ldm: ComfyUI and single-file checkpoints;
    SD3/Flux q, k and v fused as there) unless ``key_format`` is diffusers."""
    if config.key_format == "diffusers":
        return None
    if base.is_flow:
        naming = sd3.NAMING if base.kind == "sd3" else flux.NAMING
        shapes = {name: tuple(tensor.shape) for name, tensor in base.denoiser.state_dict().items()}
        original = naming.original_shapes(shapes)
        return lambda delta: fit_delta(delta, original, f"the original {base.kind} naming")
    unet_config = dict(base.unet.config)
    return lambda delta: delta_to_ldm_keys(delta, unet_config)


def sample_renderer(base: BaseModel, config: TrainConfig, device: torch.device):
    """``render(step) -> images`` for the validation prompts: same seed every time, so the images of
    different steps differ only by what was learned."""
    pipeline = base.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    compute_dtype = config.compute_dtype
    t5_length = {"max_sequence_length": base.text_tokens} if base.text_tokens is not None else {}

    def render(step: int) -> list[Image.Image]:
        generator = torch.Generator(device="cpu").manual_seed(config.sample_seed)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            return pipeline(
                list(config.sample_prompts),
                num_inference_steps=config.sample_steps,
                guidance_scale=config.sample_guidance,
                generator=generator,
                height=config.resolution,
                width=config.resolution,
                **t5_length,
            ).images

    return render
