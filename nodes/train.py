"""SaRA Train: fine-tune the smallest-|w| entries of a MODEL on latents inside a ComfyUI graph."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import comfy.model_management
import comfy_extras.nodes_custom_sampler
import folder_paths
import torch
from comfy_api.latest import io
from server import PromptServer

import sara_train
from sara_train import DTYPES, SaRAConfig, SparseDelta
from sara_train.trainer.timesteps import TIMESTEP_SAMPLINGS

from .adapter import patch_model
from .common import LOSS_MAP, NONE, SARA_DELTA, numbered_path, sara_folder
from .train_data import TrainingSet, build_training_set
from .train_loop import CancelWatch, SaRATrainSampler, StepReport, TrainOutcome, TrainSettings

log = logging.getLogger("comfyui-sara")
LOSS_EVENT = "sara.loss"
RANK_LAYERS_PER_STEP = 4
"""Layers whose nuclear norm is taken per step, in rotation (the README's benchmark gives its cost)."""
TRAINING_MEMORY_FACTOR = 3
"""Device memory kept free for a training step, in units of ComfyUI's inference estimate for the
batch (activations saved for backward, gradients of the sparse values)."""
TRAINING_DTYPES = ("bf16", "fp32")
"""Compute dtypes offered (names of ``sara_train.DTYPES``); fp32 trains in the model's own precision."""


class SaRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRATrain",
            display_name="SaRA Train",
            category="sara",
            description="Fine-tune a model with SaRA: only the weight entries with the smallest |w| train, as a "
            "sparse update kept low-rank by a nuclear-norm loss and re-selected half way.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to fine-tune (it is not changed; the output is a copy)."),
                io.Latent.Input(
                    "latents",
                    tooltip="Training images encoded with VAE Encode: one batch, or a list "
                    "(images of different sizes train in per-size batches).",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="One conditioning for all images, or one per image (a "
                    "list, or one conditioning with one entry per image).",
                ),
                io.Int.Input("steps", default=200, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Int.Input("batch_size", default=1, min=1, max=1024),
                io.Int.Input(
                    "grad_accumulation",
                    default=1,
                    min=1,
                    max=1024,
                    tooltip="Batches whose gradients are summed per optimizer step.",
                ),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6),
                io.Float.Input(
                    "budget",
                    default=0.05,
                    min=1e-6,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of the weight entries that train (the smallest |w|).",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=1e-5,
                    tooltip="If > 0, train the entries with |w| below this instead of using the budget.",
                ),
                io.Float.Input(
                    "rank_loss_weight",
                    default=1e-4,
                    min=0.0,
                    max=10.0,
                    step=1e-5,
                    tooltip="Weight of the nuclear-norm loss that keeps each layer's update low-rank.",
                ),
                io.Float.Input(
                    "progressive_fraction",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Re-select the entries still below the threshold after this fraction of "
                    "the steps (0 = never).",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Combo.Input(
                    "training_dtype",
                    options=list(TRAINING_DTYPES),
                    default="bf16",
                    tooltip="Mixed-precision compute dtype; the trainable values stay fp32.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute activations in backward: less memory, more time per step.",
                ),
                io.Int.Input(
                    "save_every",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Write the delta to models/sara every N steps (0 = off).",
                ),
                io.String.Input(
                    "save_prefix",
                    default="sara_delta",
                    tooltip="File name prefix of the periodic saves in models/sara "
                    "(<prefix>_<NNNNN>_step<N>.safetensors; may name a subfolder).",
                ),
                io.Combo.Input(
                    "existing_delta",
                    options=[NONE, *folder_paths.get_filename_list("sara")],
                    default=NONE,
                    tooltip="Continue training from this delta (models/sara).",
                ),
                io.Combo.Input(
                    "timestep_sampling",
                    options=list(TIMESTEP_SAMPLINGS),
                    default="uniform",
                    tooltip="How noise levels are drawn: uniform, logit_normal (favours the middle; SD3/Flux "
                    "training) or mode (SD3's skewed density). The model's own shift is applied.",
                ),
                io.Float.Input(
                    "min_snr_gamma",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Min-SNR-γ loss weighting for epsilon/v-prediction models (SD1.x/2.x/XL); 5 is usual, "
                    "0 is off. Not for flow models (SD3, Flux, ...).",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability that an image trains with the dropout conditioning instead of its "
                    "prompt (keeps the model working without the prompt, e.g. for CFG).",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.0,
                    min=0.0,
                    max=0.99999,
                    step=0.0001,
                    tooltip="Keep an exponential moving average of the learned update (sparse: only the "
                    "trained entries), returned as ema_delta; 0.999 is usual, 0 is off.",
                ),
                io.Conditioning.Input(
                    "dropout_conditioning",
                    optional=True,
                    tooltip="What a dropped caption trains with: CLIP Text Encode of an empty prompt. "
                    "Unconnected: the first conditioning zeroed (as Conditioning Zero Out).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the learned delta applied."),
                SARA_DELTA.Output(display_name="delta"),
                LOSS_MAP.Output(display_name="loss_map", tooltip="{'loss': [...]}, for the Plot Loss Graph node."),
                SARA_DELTA.Output(
                    display_name="ema_delta",
                    tooltip="The moving average of the learned update (the delta itself when ema_decay is 0).",
                ),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # it shows the loss chart and status, and runs even with nothing attached
        )

    @classmethod
    def execute(cls, model, latents, positive, dropout_conditioning=None, **options) -> io.NodeOutput:
        options = {name: values[0] for name, values in options.items()}
        model = model[0]
        with torch.inference_mode(False):
            data = build_training_set(
                [clone_tensors(latent) for latent in latents],
                [clone_tensors(conditioning) for conditioning in positive],
                None if dropout_conditioning is None else clone_tensors(dropout_conditioning[0]),
            )
            settings = settings_from_options(options)
            periodic = PeriodicSaver(options["save_every"], options["save_prefix"], settings.steps)
            node_id = cls.hidden.unique_id
            cancel = CancelWatch(settings.steps, node_id)
            started = time.perf_counter()

            def on_step(report: StepReport) -> None:
                PromptServer.instance.send_sync(
                    LOSS_EVENT, {"node": node_id, "step": report.step, "total": settings.steps, "loss": report.loss}
                )
                periodic.maybe_save(report)
                cancel.progress(report.step)

            outcome = train(model, data, settings, on_step, cancel.requested)
            seconds = time.perf_counter() - started
            metadata = training_metadata(model, data, options, settings, outcome, seconds)
            delta = SparseDelta(outcome.delta.layers, outcome.delta.selection, metadata)
            ema_delta = delta
            if outcome.ema_delta is not None:
                ema_metadata = {**metadata, **outcome.ema_delta.metadata}
                ema_delta = SparseDelta(outcome.ema_delta.layers, outcome.ema_delta.selection, ema_metadata)
            if outcome.stopped_early:
                log.warning(
                    "SaRA Train: stopped after %d of %d steps: %s",
                    outcome.steps_done,
                    settings.steps,
                    outcome.stopped_early,
                )
            if outcome.cancelled:
                log.warning(
                    "SaRA Train: cancelled after %d of %d steps; returning what was learned",
                    outcome.steps_done,
                    settings.steps,
                )
                if outcome.steps_done:
                    periodic.save(outcome.steps_done, delta, ema_delta if outcome.ema_delta is not None else None)
            log.info(
                "SaRA Train: %d steps in %.1f s, %s trainable entries, final loss %s",
                outcome.steps_done,
                seconds,
                f"{outcome.num_trainable:,}",
                f"{outcome.losses[-1]:.5f}" if outcome.losses else "-",
            )
        trained_model = patch_model(model, delta, 1.0, check_base=False)
        ui = {"sara_loss": outcome.losses, "sara_status": [status_line(outcome, settings.steps, seconds)]}
        return io.NodeOutput(trained_model, delta, {"loss": outcome.losses}, ema_delta, ui=ui)


def train(
    model,
    data: TrainingSet,
    settings: TrainSettings,
    on_step: Callable[[StepReport], None],
    should_stop: Callable[[], bool],
) -> TrainOutcome:
    """Train SaRA on a clone of ``model`` (a ModelPatcher) through ComfyUI's sampling machinery.

    The model is loaded the way ComfyUI loads it for sampling, with room kept for the training
    batch's activations: fully when it fits, else partially (lowvram: the other layers stay where
    they are and are cast per forward, which SaRA's sparse weights follow)."""
    patcher = model.clone()
    if settings.autocast_dtype is not None:
        patcher.set_model_compute_dtype(settings.autocast_dtype)
    batch_shape = (settings.batch_size, *data.buckets[0].latents.shape[1:])
    reserve = TRAINING_MEMORY_FACTOR * patcher.memory_required(batch_shape)
    comfy.model_management.load_models_gpu([patcher], memory_required=reserve)
    flat_conditioning, slices = [], []
    for conditioning in [*data.conditionings, data.dropout_conditioning]:
        slices.append(slice(len(flat_conditioning), len(flat_conditioning) + len(conditioning)))
        flat_conditioning.extend(conditioning)
    sampler = SaRATrainSampler(data, settings, slices[:-1], slices[-1], on_step, should_stop)
    guider = comfy_extras.nodes_custom_sampler.Guider_Basic(patcher)
    guider.set_conds(flat_conditioning)
    shape = (1, *data.buckets[0].latents.shape[1:])
    placeholder = torch.zeros(shape)
    guider.sample(placeholder, placeholder, sampler, torch.ones(2), seed=settings.seed)
    return sampler.outcome


def settings_from_options(options: dict) -> TrainSettings:
    """The node's options as ``TrainSettings``, checked before any model is touched (ComfyUI's own
    range check lets NaN through): ``ValueError`` / ``SaRAError`` naming the bad option."""
    for name in (
        "learning_rate",
        "budget",
        "threshold",
        "rank_loss_weight",
        "progressive_fraction",
        "min_snr_gamma",
        "caption_dropout",
        "ema_decay",
    ):
        if not math.isfinite(options[name]):
            raise ValueError(f"{name} must be a finite number, got {options[name]}")
    steps = options["steps"]
    threshold = options["threshold"]
    selection = SaRAConfig(threshold=threshold) if threshold > 0 else SaRAConfig(budget=float(options["budget"]))
    progressive_at = round(options["progressive_fraction"] * steps)
    existing = None
    if options["existing_delta"] not in (None, NONE):
        existing = SparseDelta.load(folder_paths.get_full_path_or_raise("sara", options["existing_delta"]))
    return TrainSettings(
        steps=steps,
        batch_size=options["batch_size"],
        grad_accumulation=options["grad_accumulation"],
        learning_rate=options["learning_rate"],
        selection=selection,
        rank_weight=options["rank_loss_weight"],
        rank_layers_per_step=RANK_LAYERS_PER_STEP,
        progressive_at=progressive_at if 0 < progressive_at < steps else None,
        seed=options["seed"],
        autocast_dtype=None if options["training_dtype"] == "fp32" else DTYPES[options["training_dtype"]],
        gradient_checkpointing=options["gradient_checkpointing"],
        existing=existing,
        timestep_sampling=options["timestep_sampling"],
        min_snr_gamma=options["min_snr_gamma"],
        caption_dropout=options["caption_dropout"],
        ema_decay=options["ema_decay"],
    )


class PeriodicSaver:
    """Writes ``models/sara/<prefix>_<NNNNN>_step<N>.safetensors`` every ``every`` steps, ``NNNNN``
    chosen at the first save by the nodes' one numbering policy (``numbered_path``), so a run never
    overwrites another's files. Files are written atomically (a cancelled or failed save leaves no
    partial file). A bad prefix is refused when the saver is made, before training."""

    def __init__(self, every: int, prefix: str, total_steps: int) -> None:
        self.every = every
        self.prefix = prefix
        self.digits = len(str(total_steps))
        self.run_stem: str | None = None
        if every:
            numbered_path(sara_folder(), prefix)  # checks the prefix now; creates nothing but its folder

    def maybe_save(self, report: StepReport) -> None:
        if self.every and report.step % self.every == 0:
            ema = report.current_ema_delta() if report.current_ema_delta is not None else None
            self.save(report.step, report.current_delta(), ema)

    def save(self, step: int, delta: SparseDelta, ema_delta: SparseDelta | None = None) -> None:
        """Writes ``..._step<N>.safetensors`` and, given ``ema_delta``, ``..._step<N>_ema.safetensors``."""
        if not self.every:
            return
        tag = f"step{step:0{self.digits}d}"
        if self.run_stem is None:
            self.run_stem = numbered_path(sara_folder(), self.prefix, tag).removesuffix(f"{tag}.safetensors")
        for suffix, saved in (("", delta), ("_ema", ema_delta)):
            if saved is not None:
                path = f"{self.run_stem}{tag}{suffix}.safetensors"
                saved.save(path, dtype=torch.float16)
                log.info("SaRA Train: saved %s", path)


def training_metadata(
    model, data: TrainingSet, options: dict, settings: TrainSettings, outcome: TrainOutcome, seconds: float
) -> dict[str, str]:
    """What a saved delta records about how it was made (strings, for safetensors metadata)."""
    losses = outcome.losses
    steps_done = len(losses)
    metadata = {
        "trainer": f"comfyui-sara SaRA Train {sara_train.__version__}",
        "base_model_type": type(model.model.model_config).__name__,
        "steps": str(steps_done),
        "images": str(data.num_images),
        "training_seconds": f"{seconds:.1f}",
        "final_loss": f"{losses[-1]:.6g}" if losses else "",
        "captions_dropped": f"{outcome.captions_dropped} of {outcome.images_drawn}",
    }
    for name in (
        "steps",
        "batch_size",
        "grad_accumulation",
        "learning_rate",
        "budget",
        "threshold",
        "rank_loss_weight",
        "progressive_fraction",
        "seed",
        "training_dtype",
        "gradient_checkpointing",
        "existing_delta",
        "timestep_sampling",
        "min_snr_gamma",
        "caption_dropout",
        "ema_decay",
    ):
        metadata[f"option_{name}"] = str(options[name])
    if settings.existing is not None:
        previous = settings.existing.metadata.get("steps", "")
        if previous.isdigit():
            metadata["steps"] = str(int(previous) + steps_done)
    return metadata


def status_line(outcome: TrainOutcome, total_steps: int, seconds: float) -> str:
    state = "cancelled" if outcome.cancelled else "stopped early" if outcome.stopped_early else "done"
    loss = f", final loss {outcome.losses[-1]:.4f}" if outcome.losses else ""
    return (
        f"{state}: {outcome.steps_done}/{total_steps} steps in {seconds:.1f} s, "
        f"{outcome.num_trainable:,} trainable entries{loss}"
    )


def clone_tensors(value):
    """A copy of a LATENT/CONDITIONING structure whose tensors are normal (not inference-mode) tensors."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: clone_tensors(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(clone_tensors(item) for item in value)
    return value
