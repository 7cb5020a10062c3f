"""Loading the base model to fine-tune: a diffusers folder or a single-file ``.safetensors``.

``load_base(path)`` gives a ``BaseModel``: the diffusers pipeline's components, the denoiser to
train (a Stable Diffusion 1.x/2.x/XL UNet, an SD3/3.5 or Flux.1 transformer), its training
``objective``, and the two encoders the latent cache needs (``encode_prompts``, ``encode_images``).
Offline only: configs come from the folder itself, from ``config_dir``, or from
the local Hugging Face cache; nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import SafetensorError, safe_open

from ..engine.errors import SaRAError
from ..engine.files import SafetensorsHeader, read_safetensors_header
from ..families import flux, sd3
from .objective import DenoisingObjective, FlowMatchingObjective, Objective
from .types import PromptEmbedding

BaseKind = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
FLOW_KINDS = ("sd3", "flux")
"""The families trained with flow matching (a transformer, not a UNet)."""
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
    "FluxPipeline": FluxPipeline,
}
"""The pipelines sara-train fine-tunes, by the ``_class_name`` of their model_index.json."""
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PROMPT_BATCH = 64
"""Prompts encoded per text-encoder call."""
FINGERPRINT_SAMPLES = 64
"""Entries per tensor, evenly spaced, that go into ``BaseModel.fingerprint``."""
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, SingleFileComponentError)
"""What diffusers/transformers raise for missing, corrupt or mismatched component files (a single
file without, e.g., its text encoder raises ``SingleFileComponentError``)."""


@dataclass
class BaseModel:
    """A base model, loaded: Stable Diffusion 1.x/2.x/XL (``kind`` sd1/sd2/sdxl), SD3/3.5 (sd3) or
    Flux.1 (flux).

    ``denoiser`` (the UNet or transformer), ``vae``, ``text_encoders`` and ``tokenizers`` are the
    components of ``diffusers_pipeline`` (the same objects; SDXL and Flux have two text encoders,
    SD3 three, the last one T5). ``noise_scheduler``: for UNets a ``DDPMScheduler`` with the
    pipeline's scheduler config (betas, ``prediction_type``), for adding training noise; None for
    the flow families. ``text_tokens``: the T5 sequence length prompts are encoded to (flow
    families; None: the pipeline's default). ``fingerprint``: 16 hex digits identifying what turns
    images and captions into training examples (VAE, text encoders, tokenizers, their dtype, the
    T5 length); equal for the same model loaded from a folder or a single file.
    """

    kind: BaseKind
    diffusers_pipeline: DiffusionPipeline
    noise_scheduler: DDPMScheduler | None
    source: Path
    fingerprint: str
    text_tokens: int | None = None

    @property
    def is_flow(self) -> bool:
        return self.kind in FLOW_KINDS

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model SaRA trains: the pipeline's ``transformer`` (flow families) or ``unet``."""
        return self.diffusers_pipeline.transformer if self.is_flow else self.diffusers_pipeline.unet

    @property
    def unet(self) -> torch.nn.Module:
        """The Stable Diffusion UNet; ``SaRAError`` for the transformer families."""
        if self.is_flow:
            raise SaRAError(f"{self.source} is a {self.kind} model: it has a transformer, not a UNet")
        return self.diffusers_pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.diffusers_pipeline.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return _text_components(self.diffusers_pipeline, "text_encoder")

    @property
    def tokenizers(self) -> list[Any]:
        return _text_components(self.diffusers_pipeline, "tokenizer")

    def objective(
        self,
        snr_gamma: float = 0.0,
        sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float | None = None,
        guidance: float = 1.0,
    ) -> Objective:
        """The training objective of this family: ``DenoisingObjective`` (min-SNR-``snr_gamma``)
        for UNets, ``FlowMatchingObjective`` with the pipeline's scheduler config and the given
        timestep ``sampling``, ``shift`` and Flux ``guidance`` for the flow families. ``SaRAError``
        for options that do not apply to the family."""
        if not self.is_flow:
            changed = {
                "--timestep-sampling": sampling != "uniform",
                "--flow-shift": shift is not None,
                "--guidance": guidance != 1.0,
            }
            if any(changed.values()):
                names = ", ".join(name for name, given in changed.items() if given)
                raise SaRAError(f"{names}: for flow-matching bases (SD3, Flux); {self.source} is {self.kind}")
            return DenoisingObjective(self.noise_scheduler, snr_gamma)
        if snr_gamma:
            raise SaRAError(
                f"--snr-gamma weights ε/v-prediction losses; {self.source} is a flow-matching {self.kind} "
                f"model: choose its timesteps with --timestep-sampling"
            )
        if guidance != 1.0 and not (self.kind == "flux" and self.denoiser.config.guidance_embeds):
            raise SaRAError(f"--guidance: {self.source} has no guidance input (only Flux.1-dev-like models do)")
        return FlowMatchingObjective(
            self.kind,
            dict(self.diffusers_pipeline.scheduler.config),
            sampling,
            logit_mean,
            logit_std,
            mode_scale,
            shift,
            guidance,
        )

    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline of these components, with its own sampling scheduler, for
        rendering images (a UNet trained in place renders as trained)."""
        return self.diffusers_pipeline

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[PromptEmbedding]:
        """One ``PromptEmbedding`` per prompt, exactly as the pipeline conditions its denoiser.

        Calls the pipeline's own ``encode_prompt`` (no classifier-free guidance, no clip skip):
        SD1.x the text encoder's last hidden state; SD2.x likewise, which is the original model's
        penultimate layer because diffusers' SD2 text encoder already omits the last one; SDXL
        both encoders' penultimate states concatenated (``hidden_states`` [L, D1 + D2]) and
        encoder 2's pooled projection (``pooled`` [P]); SD3 the two CLIP encoders' states padded to
        T5's width followed by T5's ([L_clip + L_t5, D_t5]) and both pooled projections; Flux T5's
        states ([L_t5, D_t5]) and CLIP's pooled output. Tensors are on the text encoders' device in
        their dtype; L_clip is the CLIP tokenizer's ``model_max_length``, L_t5 ``text_tokens``.
        """
        pipe = self.diffusers_pipeline
        device = self.text_encoders[0].device
        embeddings: list[PromptEmbedding] = []
        for start in range(0, len(prompts), PROMPT_BATCH):
            batch = list(prompts[start : start + PROMPT_BATCH])
            if self.kind == "sd3":
                states, _, pooled, _ = pipe.encode_prompt(
                    batch, None, None, device=device, do_classifier_free_guidance=False, **self._t5_length()
                )
                embeddings += [PromptEmbedding(s, p) for s, p in zip(states, pooled)]
            elif self.kind == "flux":
                states, pooled, _ = pipe.encode_prompt(batch, None, device=device, **self._t5_length())
                embeddings += [PromptEmbedding(s, p) for s, p in zip(states, pooled)]
            elif self.kind == "sdxl":
                states, _, pooled, _ = pipe.encode_prompt(
                    batch, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                embeddings += [PromptEmbedding(s, p) for s, p in zip(states, pooled)]
            else:
                states, _ = pipe.encode_prompt(batch, device, 1, False)
                embeddings += [PromptEmbedding(s) for s in states]
        return embeddings

    def _t5_length(self) -> dict[str, int]:
        return {} if self.text_tokens is None else {"max_sequence_length": self.text_tokens}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of ``pixels`` [B, 3, H, W] in [-1, 1]: float32 [B, C, H/f, W/f] on the VAE's
        device, f = 2 ** (VAE levels - 1).

        Uses the mean of the VAE's latent distribution (deterministic, so latents can be cached;
        the sampled noise is tiny next to the diffusion noise), then ``(z - shift_factor) *
        scaling_factor`` as the pipelines' decoders expect. Raises ``SaRAError`` for a wrong shape,
        a size not divisible by f, or values outside [-1, 1].
        """
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % factor or pixels.shape[3] % factor:
            raise SaRAError(
                f"encode_images needs pixels of shape [B, 3, H, W] with H and W divisible by "
                f"{factor}, got {tuple(pixels.shape)}"
            )
        if pixels.numel() and (float(pixels.min()) < -1.001 or float(pixels.max()) > 1.001):
            raise SaRAError(
                f"encode_images needs pixels in [-1, 1], got values in "
                f"[{float(pixels.min()):.3g}, {float(pixels.max()):.3g}]"
            )
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean.float()
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor


def load_base(
    path: str | os.PathLike,
    *,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    text_tokens: int | None = None,
) -> BaseModel:
    """Load a Stable Diffusion 1.x / 2.x / XL, SD3/3.5 or Flux.1 base model, offline.

    ``path``: a diffusers folder (with model_index.json) or a single-file ``.safetensors``
    checkpoint in the original layout. A single file needs its diffusers configs: from
    ``config_dir`` (a local diffusers folder of the same architecture), else from the local
    Hugging Face cache. For SD1/SD2/SDXL the file holds the whole model and the folder's weights
    are not used; for SD3 and Flux the file's transformer is used (a transformer-only file, as
    Flux is released, or a full checkpoint) and the VAE and text encoders come from the folder.
    Every weight is loaded as ``dtype`` onto ``device``, except the VAE's, which stay float32 (a
    bf16/fp16 VAE loses detail, and SDXL's overflows in fp16); loading in bf16 halves the bytes of
    the weights held while loading. ``text_tokens``: the T5 sequence length
    of SD3/Flux prompts (None: the pipeline's default, 256 for SD3 and 512 for Flux).
    Raises ``SaRAError`` naming the path and the cause: missing path, folder without
    model_index.json, pickle-based files (.ckpt/.pt/.bin; never unpickled), corrupt files, an
    unsupported pipeline, or no config for a single file.
    """
    source = Path(path)
    if source.is_dir():
        pipe = _load_folder(source, dtype)
    elif source.is_file():
        pipe = _load_single_file(source, None if config_dir is None else Path(config_dir), dtype)
    else:
        raise SaRAError(f"base model {source}: no such file or folder")
    for name, component in pipe.components.items():  # a no-op where a loader already applied the dtypes
        if isinstance(component, torch.nn.Module):
            component.to(torch.float32 if name == "vae" else dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    kind = detect_kind(pipe)
    return BaseModel(
        kind=kind,
        diffusers_pipeline=pipe,
        noise_scheduler=None if kind in FLOW_KINDS else DDPMScheduler.from_config(pipe.scheduler.config),
        source=source,
        fingerprint=encoder_fingerprint(pipe, kind, text_tokens if kind in FLOW_KINDS else None),
        text_tokens=text_tokens if kind in FLOW_KINDS else None,
    )


def detect_kind(pipe: DiffusionPipeline) -> BaseKind:
    """ "sd3" or "flux" by pipeline; for UNets "sdxl" with two text encoders or SDXL's ``text_time``
    conditioning; else "sd2" when the UNet's transformers project linearly (SD2.x does; SD1.x uses
    1x1 convolutions); else "sd1"."""
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, FluxPipeline):
        return "flux"
    config = pipe.unet.config
    if len(_text_components(pipe, "text_encoder")) == 2 or config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def encoder_fingerprint(pipe: DiffusionPipeline, kind: str, text_tokens: int | None = None) -> str:
    """16 hex digits over the VAE and text encoders (every tensor's name, shape, dtype and
    ``FINGERPRINT_SAMPLES`` evenly spaced values), the VAE's latent scaling, the tokenizers'
    vocabularies and the T5 length: what the cached latents and embeddings depend on."""
    digest = hashlib.sha256(f"{kind}:{text_tokens}".encode() if text_tokens is not None else kind.encode())
    vae_config = pipe.vae.config
    digest.update(f"{vae_config.scaling_factor}:{vae_config.get('shift_factor')}".encode())
    modules = [("vae", pipe.vae)] + [
        (f"text_encoder_{i}", m) for i, m in enumerate(_text_components(pipe, "text_encoder"))
    ]
    for module_name, module in modules:
        digest.update(f"{module_name}:{type(module).__name__}".encode())
        for key, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            samples = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
            digest.update(f"{key}:{list(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(samples.float().cpu().numpy().tobytes())
    for tokenizer in _text_components(pipe, "tokenizer"):
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        digest.update(str(tokenizer.model_max_length).encode())
    return digest.hexdigest()[:16]


def _text_components(pipe: DiffusionPipeline, name: str) -> list[Any]:
    found = (getattr(pipe, name + suffix, None) for suffix in ("", "_2", "_3"))
    return [component for component in found if component is not None]


def _pipeline_class(folder: Path) -> type[DiffusionPipeline]:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise SaRAError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        class_name = json.loads(index_path.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SaRAError(f"{index_path}: not a valid model_index.json ({exc})") from None
    if class_name not in PIPELINE_CLASSES:
        raise SaRAError(
            f"{folder} holds a {class_name}; sara-train fine-tunes Stable Diffusion 1.x/2.x/XL, SD3/3.5 "
            f"and Flux.1 ({', '.join(PIPELINE_CLASSES)})"
        )
    return PIPELINE_CLASSES[class_name]


def _pipeline_options(pipeline_class: type[DiffusionPipeline]) -> dict[str, Any]:
    """No safety checker: it is not trained and would only cost memory."""
    if pipeline_class is StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _load_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    pipeline_class = _pipeline_class(folder)
    try:
        return pipeline_class.from_pretrained(
            folder,
            dtype=_component_dtypes(dtype),
            use_safetensors=True,
            local_files_only=True,
            **_pipeline_options(pipeline_class),
        )
    except LOAD_ERRORS as exc:
        raise SaRAError(
            f"cannot load the diffusers folder {folder}: {exc} (sara-train reads .safetensors weights only)"
        ) from None


def _component_dtypes(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s per-component dtypes: ``dtype``, the VAE float32 (``load_base``)."""
    return {"default": dtype, "vae": torch.float32}


def _load_single_file(path: Path, config_dir: Path | None, dtype: torch.dtype) -> DiffusionPipeline:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SaRAError(
            f"{path} is a pickle-based checkpoint ({path.suffix}); sara-train never unpickles "
            f"files. Convert it to .safetensors with a tool you trust"
        )
    if path.suffix.lower() != ".safetensors":
        raise SaRAError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
    header = read_safetensors_header(path)
    config_folder = config_dir if config_dir is not None else _cached_config_folder(path, header)
    if not config_folder.is_dir():
        raise SaRAError(f"--base-config {config_folder}: no such folder")
    pipeline_class = _pipeline_class(config_folder)
    if pipeline_class in (StableDiffusion3Pipeline, FluxPipeline):
        return _load_transformer_file(path, config_folder, pipeline_class, dtype)
    try:
        return pipeline_class.from_single_file(  # in float32: load_base casts all but the VAE
            str(path),
            config=str(config_folder),
            dtype=torch.float32,
            local_files_only=True,
            **_pipeline_options(pipeline_class),
        )
    except LOAD_ERRORS as exc:
        cause = f"it has no tensor {exc}" if isinstance(exc, KeyError) else str(exc)
        raise SaRAError(
            f"cannot load {path} as a {pipeline_class.__name__} with the configs of {config_folder} "
            f"({cause}); is that folder the checkpoint's architecture?"
        ) from None


def _load_transformer_file(
    path: Path, config_folder: Path, pipeline_class: type[DiffusionPipeline], dtype: torch.dtype
) -> DiffusionPipeline:
    """The pipeline of ``config_folder`` with its transformer read from the single file ``path``:
    the original naming (Black Forest Labs' or Stability's release, ComfyUI's; bare or under a
    checkpoint's ``model.diffusion_model.``), any float dtype (fp8 included), turned into diffusers
    tensors by the family's naming table (``families``); a full checkpoint's other parts are not read."""
    is_sd3 = pipeline_class is StableDiffusion3Pipeline
    naming = sd3.NAMING if is_sd3 else flux.NAMING
    transformer_class = SD3Transformer2DModel if is_sd3 else FluxTransformer2DModel
    header = read_safetensors_header(path)
    found = naming.target_model({key: entry.shape for key, entry in header.tensors.items()})
    if found is None or found[0] != "original":
        raise SaRAError(
            f"{path} holds no {'SD3' if is_sd3 else 'Flux'} transformer in the original naming (no "
            f"{' / '.join(naming.signatures['original'])}); is --base-config {config_folder} its architecture?"
        )
    _, prefix, bare = found
    with safe_open(path, framework="pt") as file:
        original = {key: file.get_tensor(prefix + key).to(dtype) for key in bare}
    try:
        with torch.device("meta"):
            transformer = transformer_class.from_config(transformer_class.load_config(config_folder / "transformer"))
        transformer.load_state_dict(naming.to_diffusers(original), strict=True, assign=True)
        unset = [name for name, tensor in transformer.named_buffers() if tensor.is_meta]
        if unset:
            raise ValueError(f"buffers {unset} have no value")
    except (OSError, ValueError, RuntimeError) as exc:
        raise SaRAError(
            f"cannot load {path} as the {transformer_class.__name__} of {config_folder} ({exc}); is that "
            f"folder the checkpoint's architecture?"
        ) from None
    try:
        return pipeline_class.from_pretrained(
            config_folder,
            transformer=transformer,
            dtype=_component_dtypes(dtype),
            use_safetensors=True,
            local_files_only=True,
        )
    except LOAD_ERRORS as exc:
        raise SaRAError(f"cannot load the VAE and text encoders of {config_folder}: {exc}") from None


def _cached_config_folder(path: Path, header: SafetensorsHeader) -> Path:
    """The local Hugging Face cache's copy of the diffusers repo diffusers would use for this
    checkpoint's configs (never downloaded)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    shapes = {name: torch.empty(entry.shape, device="meta") for name, entry in header.tensors.items()}
    repo_id = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise SaRAError(
            f"{path}: single-file checkpoints need their diffusers config and none was found "
            f"offline (looked for {repo_id} in the local Hugging Face cache); pass --base-config "
            f"<local diffusers folder of the same architecture>"
        ) from None
