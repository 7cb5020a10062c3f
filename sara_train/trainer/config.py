"""``LoopConfig`` (what the training loop reads) and ``TrainConfig`` (every option of ``sara-train
train``), from a TOML file and/or command-line flags.

The dataclasses are the single source of truth: each field's ``help`` becomes its ``--flag`` help
(and its ``choices`` the flag's), and a TOML file uses the same names (``learning_rate = 1e-4``;
dashes or underscores). Flags given on the command line override the file; anything given in
neither keeps its default here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch

from ..engine.delta import DTYPES
from ..engine.errors import SaRAError
from ..engine.optim import MOMENTS
from .timesteps import TIMESTEP_SAMPLINGS
from .tracking import TRACKERS

GROUPS = ("inputs", "images", "optimisation", "sara", "outputs")
"""The ``--help`` sections, in order."""


def option(default: Any, help: str, group: str, choices: tuple[str, ...] = ()) -> Any:
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "group": group, "choices": choices}, **factory)


@dataclass
class LoopConfig:
    """The options ``run_training`` reads: optimisation, SaRA selection, and the run folder's saves.
    ``validate()`` checks them (the loop calls it)."""

    output_dir: str = option(
        "sara-output", "Where deltas, samples, the loss log/plot and the resume state go.", "inputs"
    )
    # -- optimisation
    steps: int = option(1000, "Optimizer steps.", "optimisation")
    batch_size: int = option(1, "Images per step per process.", "optimisation")
    grad_accumulation: int = option(1, "Micro-batches accumulated per optimizer step.", "optimisation")
    learning_rate: float = option(1e-4, "Peak AdamW learning rate.", "optimisation")
    lr_schedule: str = option(
        "constant",
        "After warm-up: constant, linear (to 0) or cosine (to 0).",
        "optimisation",
        ("constant", "linear", "cosine"),
    )
    warmup_steps: int = option(0, "Linear warm-up from 0 over this many steps.", "optimisation")
    weight_decay: float = option(
        0.0,
        "Decoupled decay of the learned update toward the pretrained weights (not of the weights toward zero).",
        "optimisation",
    )
    snr_gamma: float = option(
        0.0,
        "Min-SNR-γ loss weighting (Hang et al. 2023): clip each timestep's SNR at this value; 5 is usual, 0 is off.",
        "optimisation",
    )
    ema_decay: float = option(
        0.0,
        "Also keep a moving average of the learned update (e.g. 0.999), saved as sara_delta_ema; 0 is off.",
        "optimisation",
    )
    caption_dropout: float = option(
        0.0,
        "Fraction [0, 1) of examples trained with the empty caption instead of theirs (seeded per step).",
        "optimisation",
    )
    seed: int = option(0, "Seed for data order, noise and timesteps (0 to 2**63 - 1).", "optimisation")
    mixed_precision: str = option(
        "no",
        "no, fp16 (GPU) or bf16: base weights and activations in this dtype, fp32 master values.",
        "optimisation",
        ("no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in backward (less memory, more time per step).", "optimisation"
    )
    optimizer_moments: str = option(
        "fp32",
        "Adam's moments in fp32 (8 bytes per trained entry, exact) or 8bit (2 bytes, block-wise "
        "quantized; needs bitsandbytes).",
        "optimisation",
        MOMENTS,
    )
    offload_base: bool = option(
        False,
        "Keep the pretrained values of the trained entries in CPU memory, not on the GPU (4 bytes per "
        "entry for fp32 weights, 2 for bf16; ΔP is formed by copying them over). No effect on a CPU.",
        "optimisation",
    )
    # -- SaRA
    budget: float | None = option(
        None,
        "Fraction (0, 1] of the targeted weights to train, smallest |w| first (default 0.05 unless --threshold).",
        "sara",
    )
    threshold: float | None = option(None, "Train the entries with |w| below this instead of a budget.", "sara")
    rank_weight: float = option(1e-4, "Weight of the nuclear-norm loss on the sparse update (0 turns it off).", "sara")
    rank_layers_per_step: int | None = option(
        None, "Take the rank loss on this many layers per step, in rotation (all by default).", "sara"
    )
    progressive_fraction: float = option(
        0.5, "Re-select still-small entries after this fraction of the steps (0 turns it off).", "sara"
    )
    include: list[str] = option([], "Regex on module names: only matching modules are trained (repeatable).", "sara")
    exclude: list[str] = option([], "Regex on module names: matching modules are never trained (repeatable).", "sara")
    skip_full_resolution: bool = option(
        False,
        "Stable Diffusion UNets: leave out the layers at the latent's full resolution (about 3 percent of "
        "the weights, about a third of SaRA's extra backward work); like --exclude, the budget is then a "
        "fraction of the rest.",
        "sara",
    )
    # -- outputs
    save_every: int = option(
        0, "Also save the delta and the resume state every N steps (0: only at the end).", "outputs"
    )
    log_every: int = option(10, "Flush the loss CSV and redraw the loss plot every N steps.", "outputs")
    sample_every: int = option(
        0, "Render the validation prompts every N steps (0: only at the end, if prompts are given).", "outputs"
    )
    validation_every: int = option(
        0, "Compute the validation loss every N steps (0: only at the end), when validation data is given.", "outputs"
    )
    log_with: str = option(
        "none",
        "Also log loss, learning rate, rank and validation loss and samples to tensorboard (output-dir/tensorboard) "
        "or wandb.",
        "outputs",
        TRACKERS,
    )
    delta_dtype: str = option("fp16", "Dtype of the saved delta values: fp16, bf16 or fp32.", "outputs", tuple(DTYPES))
    resume: bool = option(False, "Continue the run in --output-dir from its last saved state.", "outputs")

    def validate(self) -> None:
        """Raise ``SaRAError`` naming the first bad option."""
        check_fields(self, dataclasses.fields(LoopConfig))
        for name in ("steps", "batch_size", "grad_accumulation", "log_every"):
            if getattr(self, name) < 1:
                raise SaRAError(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "save_every",
            "sample_every",
            "validation_every",
            "weight_decay",
            "rank_weight",
            "snr_gamma",
        ):
            if getattr(self, name) < 0:
                raise SaRAError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise SaRAError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise SaRAError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.caption_dropout < 1:
            raise SaRAError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.progressive_fraction < 1:
            raise SaRAError(f"--progressive-fraction must be in [0, 1), got {self.progressive_fraction}")
        if self.budget is not None and self.threshold is not None:
            raise SaRAError("give --budget or --threshold, not both")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise SaRAError(f"--budget must be a fraction in (0, 1], got {self.budget}")
        if self.threshold is not None and not self.threshold > 0:
            raise SaRAError(f"--threshold must be > 0, got {self.threshold}")
        if self.rank_layers_per_step is not None and self.rank_layers_per_step < 1:
            raise SaRAError(
                f"--rank-layers-per-step must be >= 1 (leave it out for all layers), got {self.rank_layers_per_step}"
            )
        if not 0 <= self.seed < 2**63:
            raise SaRAError(f"--seed must be in [0, 2**63), got {self.seed}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise SaRAError(f"--{name} {pattern!r} is not a valid regular expression ({error})") from None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of base weights and activations during training (``mixed_precision``)."""
        return torch.float32 if self.mixed_precision == "no" else DTYPES[self.mixed_precision]

    @property
    def progressive_at(self) -> int | None:
        """The optimizer step after which entries are re-selected, or None."""
        at = round(self.progressive_fraction * self.steps)
        return at if 0 < at < self.steps else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(LoopConfig):
    """Every option of ``sara-train train``: the loop's (``LoopConfig``) plus the base model, the
    dataset, its encoding and the validation samples. ``validate()`` checks them all."""

    # -- inputs
    base: str = option(
        "", "Base model: a diffusers folder (model_index.json) or a single-file .safetensors checkpoint.", "inputs"
    )
    base_config: str | None = option(
        None,
        "For a single-file base: a local diffusers folder of the same architecture whose configs and tokenizers "
        "are used (no download).",
        "inputs",
    )
    data: str = option(
        "", "Training images folder: same-name .txt captions (kohya) or a metadata.jsonl (diffusers).", "inputs"
    )
    caption_prefix: str = option("", "Prepended to every caption (a trigger word), joined with ', '.", "inputs")
    caption_extension: str = option(".txt", "Extension of caption files next to the images.", "inputs")
    validation_split: float = option(
        0.0,
        "Fraction [0, 1) of the images held out (seeded) for the validation loss, logged to validation.csv.",
        "inputs",
    )
    text_tokens: int | None = option(
        None, "SD3/Flux: T5 tokens per caption (default: the pipeline's, 256 for SD3 and 512 for Flux).", "inputs"
    )
    # -- images
    resolution: int = option(512, "Square training resolution in pixels (a multiple of 8).", "images")
    crop: str = option(
        "center", "How images are cropped to the square: center or random.", "images", ("center", "random")
    )
    random_crop_variants: int = option(4, "With --crop random: fixed random crops cached per image.", "images")
    bucket_step: int = option(
        0,
        "Aspect-ratio buckets: train each image at the size nearest its aspect ratio (1:2 to 2:1, about "
        "resolution² pixels, sides multiples of this; 64 suits every family) instead of a square crop; 0: off.",
        "images",
    )
    flip: bool = option(False, "Also train on horizontally mirrored images.", "images")
    cache_dir: str | None = option(
        None,
        "Latent/text-embedding cache (reused while inputs are unchanged); default: $XDG_CACHE_HOME/sara-train.",
        "images",
    )
    cache: bool = option(True, "Cache encoded latents and prompts on disk (--no-cache: in memory only).", "images")
    # -- optimisation
    timestep_sampling: str = option(
        "uniform",
        "SD3/Flux: how the noise level is drawn before the shift: uniform, logit_normal or mode (SD3 paper).",
        "optimisation",
        TIMESTEP_SAMPLINGS,
    )
    logit_mean: float = option(0.0, "Mean of --timestep-sampling logit_normal.", "optimisation")
    logit_std: float = option(1.0, "Standard deviation of --timestep-sampling logit_normal.", "optimisation")
    mode_scale: float = option(1.29, "Scale of --timestep-sampling mode.", "optimisation")
    flow_shift: float | None = option(
        None,
        "SD3/Flux: timestep shift s (sigma = s*u / (1 + (s-1)*u)); default: the pipeline's (SD3's shift, "
        "Flux's resolution-dependent one).",
        "optimisation",
    )
    guidance: float = option(
        1.0, "Flux.1-dev-like models: the distilled-guidance input while training.", "optimisation"
    )
    device: str = option(
        "auto",
        "cuda, cuda:N, cpu, or auto (the GPU if there is one; each process's own under accelerate launch).",
        "optimisation",
    )
    # -- outputs
    sample_prompts: list[str] = option([], "Validation prompts (repeatable).", "outputs")
    sample_steps: int = option(20, "Denoising steps per validation image.", "outputs")
    sample_guidance: float = option(7.5, "Classifier-free guidance scale of validation images.", "outputs")
    sample_seed: int = option(0, "Seed of the validation images (the same every time).", "outputs")
    key_format: str = option(
        "ldm",
        "Weight names in the delta: ldm (ComfyUI / single-file checkpoints) or diffusers.",
        "outputs",
        ("ldm", "diffusers"),
    )

    def validate(self) -> None:
        """Raise ``SaRAError`` naming the first bad option. Everything that can be checked without
        loading the model or reading the data is checked here, before any work starts."""
        if not self.base:
            raise SaRAError("no base model: pass --base (a diffusers folder or a .safetensors checkpoint)")
        if not self.data:
            raise SaRAError("no training data: pass --data (a folder of images with captions)")
        super().validate()
        check_fields(self, [spec for spec in dataclasses.fields(TrainConfig) if spec.name not in LOOP_FIELDS])
        for name in ("resolution", "random_crop_variants", "sample_steps"):
            if getattr(self, name) < 1:
                raise SaRAError(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise SaRAError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.bucket_step and (self.bucket_step < 0 or self.bucket_step % 8 or self.resolution % self.bucket_step):
            raise SaRAError(
                f"--bucket-step must be 0 or a multiple of 8 dividing --resolution {self.resolution}, "
                f"got {self.bucket_step}"
            )
        if not 0 <= self.validation_split < 1:
            raise SaRAError(f"--validation-split must be in [0, 1), got {self.validation_split}")
        if not self.logit_std > 0:
            raise SaRAError(f"--logit-std must be > 0, got {self.logit_std}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise SaRAError(f"--flow-shift must be > 0, got {self.flow_shift}")
        if self.text_tokens is not None and self.text_tokens < 1:
            raise SaRAError(f"--text-tokens must be >= 1, got {self.text_tokens}")
        if not 0 <= self.sample_seed < 2**63:
            raise SaRAError(f"--sample-seed must be in [0, 2**63), got {self.sample_seed}")
        if self.caption_extension.strip(".") == "" or "/" in self.caption_extension:
            raise SaRAError(
                f"--caption-extension must be a file extension such as .txt, got {self.caption_extension!r}"
            )
        parse_device(self.device)


def check_fields(config: LoopConfig, specs: Iterable[dataclasses.Field]) -> None:
    """``SaRAError`` for a field among ``specs`` whose value is outside its choices or a float that
    is not finite."""
    for spec in specs:
        value = getattr(config, spec.name)
        choices = spec.metadata["choices"]
        if choices and value not in choices:
            raise SaRAError(f"--{flag(spec.name)} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SaRAError(f"--{flag(spec.name)} must be a finite number, got {value}")


LOOP_FIELDS = frozenset(spec.name for spec in dataclasses.fields(LoopConfig))


def parse_device(name: str) -> torch.device | None:
    """``torch.device`` for ``--device`` (None for ``auto``). ``SaRAError`` for a name torch does not
    know, or a CUDA device when CUDA is not available."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise SaRAError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N): {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SaRAError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SaRAError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def flag(name: str) -> str:
    return name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per ``TrainConfig`` field; defaults are ``SUPPRESS`` so
    only flags actually given override the file."""
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below (flags override it).")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for spec in dataclasses.fields(TrainConfig):
        group = groups[spec.metadata["group"]]
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        help_text = spec.metadata["help"] + ("" if default in (None, "", [], False) else f" [default: {default}]")
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if spec.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.type == "list[str]":
            kwargs["action"] = "append"
        else:
            kwargs["type"] = {"int": int, "float": float, "int | None": int, "float | None": float}.get(spec.type, str)
            if spec.metadata["choices"]:
                kwargs["choices"] = spec.metadata["choices"]
        group.add_argument(f"--{flag(spec.name)}", **kwargs)


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """``TrainConfig`` from the TOML file named by ``args.config`` (if any), overridden by flags."""
    values: dict[str, Any] = {}
    config_file: Path | None = getattr(args, "config", None)
    if config_file is not None:
        values.update(read_toml(config_file))
    known = {spec.name for spec in dataclasses.fields(TrainConfig)}
    values.update({name: value for name, value in vars(args).items() if name in known})
    return TrainConfig(**values)


def read_toml(path: Path) -> dict[str, Any]:
    """The options in TOML file ``path``: top-level keys and/or a ``[train]`` table (an option given
    in both places is refused), checked by name and type."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaRAError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SaRAError(f"config file {path} cannot be read as UTF-8 text: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SaRAError(f"config file {path} is not valid TOML: {error}") from None
    table = document.pop("train", {})
    if not isinstance(table, dict):
        raise SaRAError(f"config file {path}: 'train' must be a table ([train]), got {table!r}")
    twice = sorted(set(table) & set(document))
    if twice:
        raise SaRAError(f"config file {path}: {', '.join(twice)} given both at the top level and in [train]")
    document.update(table)
    types = {spec.name: spec.type for spec in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in types:
            raise SaRAError(f"config file {path}: unknown option {key!r} (see sara-train train --help)")
        values[name] = check_type(path, key, value, types[name])
    return values


def check_type(path: Path, key: str, value: Any, type_name: str) -> Any:
    expected = {
        "str": str,
        "str | None": str,
        "int": int,
        "int | None": int,
        "float": (int, float),
        "float | None": (int, float),
        "bool": bool,
        "list[str]": list,
    }[type_name]
    if isinstance(value, bool) and type_name != "bool" or not isinstance(value, expected):
        raise SaRAError(f"config file {path}: {key} must be {type_name}, got {value!r}")
    if type_name == "list[str]" and not all(isinstance(item, str) for item in value):
        raise SaRAError(f"config file {path}: {key} must be a list of strings, got {value!r}")
    return float(value) if "float" in type_name else value
