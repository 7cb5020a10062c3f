"""The training loop: SaRA on a diffusers denoiser (a Stable Diffusion UNet, an SD3 or Flux
transformer) over cached examples.

One optimizer step, top to bottom (``run_training``):
  for each of ``grad_accumulation`` micro-batches: take the next ``batch_size * world`` examples in
  the seeded order (of one size, when aspect-ratio buckets give several: ``bucketed_batch``), draw
  noise and timesteps for all of them from one CPU generator, keep this process's slice, noise the
  latents and score the model's prediction against its target with the ``Objective`` (DDPM ε/v/x₀
  or flow matching), backward (gradients reach only the sparse SaRA values);
  then average the values' gradients over processes, set the learning rate, ``SaRAAdamW.step()``
  (which adds the rank-loss gradient and does the progressive re-selection on its step).
Everything random is a function of ``config.seed`` and the step, or lives in the saved generator
state, so ``--resume`` continues bit-identically. Processes are never wrapped in DDP: the SaRA
values are the only trainable tensors and are all-reduced by hand, which survives re-selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..engine.config import SaRAConfig
from ..engine.delta import DTYPES, SparseDelta
from ..engine.ema import SparseEMA
from ..engine.errors import SaRAError
from ..engine.files import atomic_output, check_writable_folder, read_safetensors_header
from ..engine.handle import SaRAHandle
from ..engine.optim import SaRAOptimizer, sara_optimizer_class
from ..families.sd_unet import full_resolution_modules
from ..plots.loss import plot_loss
from .config import LoopConfig
from .interrupts import Interrupted, StopSignals
from .logs import LossRow, ValidationRow, read_loss_log, read_rows, write_loss_log, write_rows
from .objective import Objective, as_objective
from .state_file import read_state_file, save_state_file
from .tracking import Tracker, open_tracker
from .types import PromptEmbedding, TrainingExample
from .validation import validation_loss, validation_set

RESUME_INDEPENDENT = {
    "output_dir",
    "log_with",
    "resume",
    "save_every",
    "log_every",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "sample_guidance",
    "sample_seed",
    "cache_dir",
    "cache",
    "delta_dtype",
    "key_format",
    "base_config",
    "device",
}
"""Options that may differ between a run and its resumption (they do not change the math)."""


@dataclass
class TrainResult:
    """What a run produced.

    ``delta_path``: the final delta, or when the run stopped early the last one saved (None if it
    stopped before saving anything). ``handle``: the ``SaRAHandle`` of the trained model (still
    injected: the model holds the learned values; ``handle.remove()`` turns it back into plain
    modules). ``interruption``: the signal that stopped the run, if any. ``stopped_early``: why
    training ended before ``config.steps`` without a signal. ``stopped_while``: what the run was
    doing when a signal arrived.
    """

    delta_path: Path | None
    losses: list[LossRow]
    handle: SaRAHandle | None
    interruption: Interrupted | None = None
    stopped_early: str | None = None
    stopped_while: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.interruption is not None

    @property
    def num_trainable(self) -> int:
        return self.handle.num_trainable if self.handle is not None else 0


@dataclass(frozen=True)
class RunFolder:
    """The files of a run inside ``root`` (``config.output_dir``)."""

    root: Path

    @property
    def delta(self) -> Path:
        return self.root / "sara_delta.safetensors"

    def delta_at(self, step: int) -> Path:
        return self.root / f"sara_delta_step{step:06d}.safetensors"

    @property
    def validation_csv(self) -> Path:
        return self.root / "validation.csv"

    @property
    def ema_delta(self) -> Path:
        return self.root / "sara_delta_ema.safetensors"

    def ema_delta_at(self, step: int) -> Path:
        return self.root / f"sara_delta_ema_step{step:06d}.safetensors"

    @property
    def state(self) -> Path:
        return self.root / "state" / "training_state.safetensors"

    @property
    def loss_csv(self) -> Path:
        return self.root / "loss.csv"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    def samples_at(self, step: int) -> Path:
        return self.root / "samples" / f"step{step:06d}.png"


def learning_rate_at(step: int, config: LoopConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1.0 - progress)
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate


def example_order(position: int, count: int, seed: int) -> int:
    """Index of the example at global ``position`` of the stream: a fresh seeded permutation per epoch."""
    epoch, offset = divmod(position, count)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(count, generator=generator)[offset])


def size_groups(examples: Sequence[TrainingExample]) -> list[list[int]]:
    """Example indices grouped by latent size (aspect-ratio buckets), groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(tuple(example.latents.shape), []).append(index)
    return list(groups.values())


def bucketed_batch(position: int, groups: Sequence[Sequence[int]], size: int, seed: int) -> list[int]:
    """Example indices of global micro-batch ``position`` when examples come in several sizes: each
    epoch, every size group in a fresh seeded order is cut into batches of ``size`` (the last one
    filled up from the group's start, so a batch is never mixed or short), and the epoch's batches
    are taken in a seeded order. Every example is seen every epoch."""
    per_epoch = sum(math.ceil(len(group) / size) for group in groups)
    epoch, offset = divmod(position, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for group in groups:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches += [[order[(start + i) % len(order)] for i in range(size)] for start in range(0, len(order), size)]
    return batches[int(torch.randperm(len(batches), generator=generator)[offset])]


class Distributed:
    """This process's place among the training processes (one process when not launched by
    ``accelerate launch`` / ``torchrun``). Collectives run on the backend's device (the GPU for
    NCCL) and return their results where the inputs were."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over processes in place (one flat all-reduce)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def largest(self, value: int) -> int:
        """The largest ``value`` any process passes (all must call it)."""
        if not self.active:
            return value
        result = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        return int(result)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def check_run_folder(folder: RunFolder, resume: bool) -> None:
    """Before any work: the folder can be written, and holds a run exactly when resuming."""
    check_writable_folder(folder.root, "--output-dir")
    if not resume and folder.state.exists():
        raise SaRAError(
            f"{folder.root} already holds a run (state in {folder.state}); pass --resume to continue "
            f"it or choose another --output-dir"
        )
    if resume and not folder.state.exists():
        raise SaRAError(
            f"--resume: no saved state in {folder.root} (expected {folder.state}); a run saves it at "
            f"--save-every steps, on Ctrl-C and at the end"
        )


def full_resolution_exclusions(model: nn.Module, skip: bool) -> list[str]:
    """``full_resolution_modules`` of ``model`` when ``skip`` (a UNet's only); else none."""
    if not skip:
        return []
    if "up_block_types" not in getattr(model, "config", {}):
        raise SaRAError(
            "--skip-full-resolution applies to Stable Diffusion UNets (SD1.x, SD2.x, SDXL); "
            f"a {type(model).__name__} has no resolution levels"
        )
    return full_resolution_modules(model.config)


def run_training(
    model: nn.Module,
    objective: Objective | Any,
    examples: Sequence[TrainingExample],
    config: LoopConfig,
    render_samples: Callable[[int], list[Image.Image]] | None = None,
    delta_metadata: dict[str, str] | None = None,
    convert_delta: Callable[[SparseDelta], SparseDelta] | None = None,
    data_fingerprint: str | None = None,
    empty_prompt: PromptEmbedding | None = None,
    validation_examples: Sequence[TrainingExample] = (),
) -> TrainResult:
    """Fine-tune ``model`` in place with SaRA on ``examples``; write the run's files; return the result.

    ``model``: the denoiser ``objective`` calls (a diffusers ``UNet2DConditionModel``,
    ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``, or any module with the same call
    signature), on the device to train on, fp32. ``objective``: an ``Objective``, or a DDPM-style
    noise scheduler meaning ``DenoisingObjective(scheduler, config.snr_gamma)``.
    ``render_samples(step)`` makes validation images with the model as it is (rank 0 only).
    ``convert_delta`` renames delta keys before saving (e.g. to LDM names). ``data_fingerprint``
    identifies the training data; it is saved with the state and a resume with other data is
    refused. ``empty_prompt``: the empty caption, encoded; needed when ``config.caption_dropout`` > 0
    (dropped examples are trained with it). ``validation_examples``: held-out examples whose
    ``validation_loss`` is logged to ``validation.csv`` every ``config.validation_every`` steps and
    at the end (main process).

    SIGINT/SIGTERM (see ``interrupts``) end the run at once: a step in progress is dropped and the
    last completed step is saved (delta, resume state, logs), unless nothing new was learned; a
    save in progress always completes. With several processes, a signal any of them receives
    stops all of them at the end of the same step. Training also ends early, saving normally, when the
    progressive step leaves no entry trainable. On return the model still holds SaRA's
    parametrization with the learned values (``result.handle``).
    """
    config.validate()
    if not examples:
        raise SaRAError("no training examples")
    if config.caption_dropout and empty_prompt is None:
        raise SaRAError("--caption-dropout needs the empty caption encoded (run_training's empty_prompt)")
    folder = RunFolder(Path(config.output_dir))
    check_run_folder(folder, config.resume)
    device = next(model.parameters()).device
    compute_dtype = config.compute_dtype
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise SaRAError("--mixed-precision fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    with StopSignals() as signals:
        try:
            if next(model.parameters()).dtype != compute_dtype:
                model.to(compute_dtype)
            model.train()
            if config.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            selection = SaRAConfig(
                threshold=config.threshold,
                budget=config.budget,
                include=list(config.include),
                exclude=list(config.exclude) + full_resolution_exclusions(model, config.skip_full_resolution),
                base_device="cpu" if config.offload_base and device.type != "cpu" else None,
            )
            optimizer = sara_optimizer_class(config.optimizer_moments)(
                model,
                lr=config.learning_rate,
                config=selection,
                rank_weight=config.rank_weight,
                rank_layers_per_step=config.rank_layers_per_step,
                progressive_at=config.progressive_at,
                weight_decay=config.weight_decay,
            )
            run = TrainingRun(
                model,
                as_objective(objective, config.snr_gamma),
                examples,
                config,
                folder,
                optimizer,
                signals,
                {"trainer": "sara-train", "config": json.dumps(config.to_dict()), **(delta_metadata or {})},
                convert_delta,
                data_fingerprint,
                empty_prompt,
                validation_examples,
            )
            if config.resume:
                run.resume()
        except KeyboardInterrupt as stop:
            return TrainResult(None, [], None, interruption=Interrupted.of(stop), stopped_while="preparing the model")
        return run.train(render_samples, compute_dtype, device)


class TrainingRun:
    """The state of one ``run_training`` call: model, optimizer, noise generator, losses, and the
    run folder's saves. ``train`` is the loop."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        examples: Sequence[TrainingExample],
        config: LoopConfig,
        folder: RunFolder,
        optimizer: SaRAOptimizer,
        signals: StopSignals,
        metadata: dict[str, str],
        convert_delta: Callable[[SparseDelta], SparseDelta] | None,
        data_fingerprint: str | None,
        empty_prompt: PromptEmbedding | None = None,
        validation_examples: Sequence[TrainingExample] = (),
    ) -> None:
        self.model, self.objective, self.examples, self.config = model, objective, examples, config
        self.folder, self.optimizer, self.signals, self.metadata = folder, optimizer, signals, metadata
        self.convert_delta, self.data_fingerprint, self.empty_prompt = convert_delta, data_fingerprint, empty_prompt
        self.distributed = Distributed()
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.noise_generator = torch.Generator().manual_seed(config.seed)
        self.ema = SparseEMA(optimizer.handle, config.ema_decay) if config.ema_decay else None
        self.validation = validation_set(validation_examples, objective, config.seed) if validation_examples else None
        self.validation_rows: list[ValidationRow] = []
        self.tracker: Tracker | None = None
        """Where the main process also logs (``config.log_with``), open while ``train`` runs."""
        self.size_groups = size_groups(examples)
        self.losses: list[LossRow] = []
        self.start_step = 0
        self.saved_step: int | None = None
        """The step whose delta and state are on disk (None: nothing saved by this process yet)."""
        self.saved_path: Path | None = None
        self.doing = "preparing"
        """What the run is doing, for the message when a signal stops it."""
        self.generator_at_step_start = self.noise_generator.get_state()

    @property
    def handle(self) -> SaRAHandle:
        return self.optimizer.handle

    def resume(self) -> None:
        self.start_step, self.losses = resume_from(
            self.folder,
            self.config,
            self.optimizer,
            self.noise_generator,
            self.scaler,
            self.distributed,
            self.data_fingerprint,
            self.ema,
        )
        self.saved_step = self.start_step
        self.validation_rows = [
            row for row in read_rows(self.folder.validation_csv, ValidationRow) if row.step <= self.start_step
        ]
        saved = [self.folder.delta_at(self.start_step), self.folder.delta]
        self.saved_path = next((path for path in saved if path.exists()), None)

    def save(self, step: int, final: bool) -> Path:
        """Delta, resume state and logs of ``step``, as one shielded block (a signal waits for it)."""
        with self.signals.shielded():
            delta = self.handle.delta(metadata={**self.metadata, "steps": str(step)})
            if self.convert_delta is not None:
                delta = self.convert_delta(delta)
            path = delta.save(
                self.folder.delta if final else self.folder.delta_at(step), dtype=DTYPES[self.config.delta_dtype]
            )
            if self.ema is not None:
                ema_delta = self.ema.delta(metadata={**self.metadata, "steps": str(step)})
                if self.convert_delta is not None:
                    ema_delta = self.convert_delta(ema_delta)
                ema_path = self.folder.ema_delta if final else self.folder.ema_delta_at(step)
                ema_delta.save(ema_path, dtype=DTYPES[self.config.delta_dtype])
            save_state(
                self.folder,
                step,
                self.config,
                self.optimizer,
                self.noise_generator,
                self.scaler,
                self.distributed,
                self.data_fingerprint,
                self.ema,
            )
            write_logs(self.folder, self.losses)
        self.saved_step, self.saved_path = step, path
        return path

    @property
    def completed(self) -> int:
        """Steps finished so far (the loss log has one row per step)."""
        return len(self.losses)

    def train(
        self,
        render_samples: Callable[[int], list[Image.Image]] | None,
        compute_dtype: torch.dtype,
        device: torch.device,
    ) -> TrainResult:
        """Steps from ``start_step`` to ``config.steps``, periodic saves and samples, the final save."""
        config, distributed = self.config, self.distributed
        progress = tqdm(
            total=config.steps,
            initial=self.start_step,
            desc="SaRA",
            unit="step",
            disable=not distributed.is_main,
            dynamic_ncols=True,
        )
        started = time.monotonic() - (self.losses[-1].seconds if self.losses else 0.0)
        stopped_early = None
        self.doing = "training"
        # Several processes stop together: a signal is only recorded, and all agree on it once per step.
        agreement = self.signals.held() if distributed.active else contextlib.nullcontext()
        if distributed.is_main:
            self.tracker = open_tracker(config.log_with, self.folder.root, config.to_dict(), self.start_step)
        try:
            with agreement:
                for step in range(self.start_step, config.steps):
                    self.doing = f"training step {step + 1}"
                    loss, learning_rate = self.step(step, started, compute_dtype, device)
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}")
                    if self.handle.num_trainable == 0:
                        stopped_early = (
                            f"the progressive step after step {self.completed} left no entry trainable "
                            f"(every learned |value| reached the threshold {self.handle.threshold:.3g}); "
                            f"the delta holds what was learned up to then"
                        )
                        break
                    if distributed.is_main:
                        self.after_step(render_samples)
                progress.close()
                path = self.folder.delta
                if distributed.is_main:
                    if self.validation is not None and not (
                        self.validation_rows and self.validation_rows[-1].step == self.completed
                    ):
                        self.validate()
                    self.doing = "saving the final delta"
                    path = self.save(self.completed, final=True)
                    self.doing = "rendering the final samples"
                    if render_samples:
                        self.save_samples(render_samples)
                distributed.barrier()
            return TrainResult(path, self.losses, self.handle, stopped_early=stopped_early)
        except KeyboardInterrupt as stop:  # Interrupted, or a plain KeyboardInterrupt (e.g. raised by a notebook)
            progress.close()
            if self.doing == f"training step {self.completed + 1}":  # unfinished: drop its draws and gradients
                self.noise_generator.set_state(self.generator_at_step_start)
                self.optimizer.zero_grad(set_to_none=True)
            if distributed.is_main and self.completed > (self.saved_step or 0):
                self.save(self.completed, final=False)
            if distributed.active and isinstance(stop, Interrupted):
                distributed.barrier()  # all stopped together: wait for the save before any process exits
            return TrainResult(
                self.saved_path, self.losses, self.handle, interruption=Interrupted.of(stop), stopped_while=self.doing
            )
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def step(self, step: int, started: float, compute_dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
        """Optimizer step ``step`` (0-based): micro-batches, gradient all-reduce, the update (which
        happens together with its loss-log row, or not at all). Returns ``(loss, learning rate)``."""
        config, distributed, optimizer = self.config, self.distributed, self.optimizer
        self.generator_at_step_start = self.noise_generator.get_state()
        torch.manual_seed(config.seed * 7919 + step)  # any global-RNG use (dropout) is a function of the step
        learning_rate = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        global_batch = config.batch_size * distributed.world
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(config.grad_accumulation):
            position = step * config.grad_accumulation + micro
            if len(self.size_groups) > 1:
                indices = bucketed_batch(position, self.size_groups, global_batch, config.seed)
            else:
                first = position * global_batch
                indices = [example_order(first + i, len(self.examples), config.seed) for i in range(global_batch)]
            batch = [self.examples[i] for i in indices]
            if config.caption_dropout:
                batch = drop_captions(batch, config.caption_dropout, self.empty_prompt, self.noise_generator)
            loss = micro_batch_loss(
                self.model,
                self.objective,
                batch,
                self.noise_generator,
                distributed,
                config.batch_size,
                compute_dtype,
                device,
            )
            backward(loss / config.grad_accumulation, self.scaler)
            loss_sum += loss.detach().double().cpu()
        distributed.average_([p.grad for p in self.handle.parameters() if p.grad is not None])
        mean_loss = loss_sum / config.grad_accumulation
        distributed.average_([mean_loss])
        if distributed.active:
            stop = distributed.largest(self.signals.received or 0)
            if stop:
                raise self.signals.stop(stop)
        if not math.isfinite(float(mean_loss)):
            raise SaRAError(
                f"the loss became {float(mean_loss)} at step {step + 1}: lower --learning-rate "
                f"or use --mixed-precision bf16/no"
            )
        with self.signals.shielded():
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
            self.losses.append(
                LossRow(
                    step + 1,
                    float(mean_loss),
                    optimizer.last_rank_loss,
                    learning_rate,
                    round(time.monotonic() - started, 3),
                )
            )
        if self.tracker is not None:
            row = self.losses[-1]
            self.tracker.log_scalars(
                row.step, {"loss": row.loss, "rank_loss": row.rank_loss, "learning_rate": row.learning_rate}
            )
        return float(mean_loss), learning_rate

    def save_samples(self, render_samples: Callable[[int], list[Image.Image]]) -> None:
        """Render the validation prompts now; save (and track) the images side by side."""
        done = self.completed
        grid = save_samples(self.folder.samples_at(done), self.model, render_samples, done)
        if self.tracker is not None:
            self.tracker.log_image(done, "samples", grid)

    def validate(self) -> None:
        """Append the validation loss of the model as it is now and rewrite ``validation.csv``."""
        self.doing = f"computing the validation loss of step {self.completed}"
        device = next(self.model.parameters()).device
        loss = validation_loss(self.model, self.objective, self.validation, self.config.compute_dtype, device)
        self.validation_rows.append(ValidationRow(self.completed, loss))
        if self.tracker is not None:
            self.tracker.log_scalars(self.completed, {"validation_loss": loss})
        with self.signals.shielded():
            write_rows(self.folder.validation_csv, self.validation_rows, ValidationRow)

    def after_step(self, render_samples: Callable[[int], list[Image.Image]] | None) -> None:
        """The main process's work after a step: the loss log, periodic saves and samples."""
        config, done = self.config, self.completed
        self.doing = f"saving step {done}"
        if done % config.log_every == 0:
            with self.signals.shielded():
                write_logs(self.folder, self.losses)
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            self.save(done, final=False)
        self.doing = f"rendering the samples of step {done}"
        if self.validation is not None and config.validation_every and done % config.validation_every == 0:
            self.validate()
        if render_samples and config.sample_every and done % config.sample_every == 0 and done < config.steps:
            self.save_samples(render_samples)


def drop_captions(
    batch: Sequence[TrainingExample], rate: float, empty_prompt: PromptEmbedding, generator: torch.Generator
) -> list[TrainingExample]:
    """``batch`` with each example's prompt replaced by ``empty_prompt`` with probability ``rate``
    (one uniform draw per example from ``generator``, for the whole global batch)."""
    dropped = (torch.rand(len(batch), generator=generator) < rate).tolist()
    return [replace(example, prompt=empty_prompt) if drop else example for example, drop in zip(batch, dropped)]


def micro_batch_loss(
    model: nn.Module,
    objective: Objective,
    batch: Sequence[TrainingExample],
    noise_generator: torch.Generator,
    distributed: Distributed,
    per_process: int,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Denoising loss of this process's slice of the global micro-batch ``batch`` (0-d fp32 tensor):
    noise and timesteps drawn for the whole global batch, then the mean over this slice of each
    example's squared error, weighted by ``objective.loss_weights`` when it has any."""
    latents = torch.stack([example.latents for example in batch]).float()
    noise = torch.randn(latents.shape, generator=noise_generator)
    timesteps = objective.draw_timesteps(len(batch), noise_generator)
    mine = slice(distributed.rank * per_process, (distributed.rank + 1) * per_process)
    errors = objective.example_errors(model, batch[mine], noise[mine], timesteps[mine], compute_dtype, device)
    weights = objective.loss_weights(timesteps[mine].to(device))
    return (errors if weights is None else errors * weights).mean()


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def write_logs(folder: RunFolder, losses: list[LossRow]) -> None:
    write_loss_log(folder.loss_csv, losses)
    if losses:
        plot_loss(folder.loss_png, [row.step for row in losses], [row.loss for row in losses])


def save_samples(
    path: Path, model: nn.Module, render_samples: Callable[[int], list[Image.Image]], step: int
) -> Image.Image:
    """Render the validation images with the model in eval mode and save them side by side; returns
    that image."""
    model.eval()
    try:
        with torch.no_grad():
            images = render_samples(step)
    finally:
        model.train()
    width = sum(image.width for image in images)
    grid = Image.new("RGB", (width, max(image.height for image in images)), "white")
    x = 0
    for image in images:
        grid.paste(image.convert("RGB"), (x, 0))
        x += image.width
    with atomic_output(path) as temp:
        grid.save(temp, format="PNG")
    return grid


PATH_OPTIONS = ("base", "data", "base_config", "output_dir", "cache_dir")
"""Options naming files or folders: compared by where they point, not how they are spelled."""


def comparable_options(options: dict) -> dict:
    """``options`` (``LoopConfig.to_dict()`` or a subclass's) with path options resolved to absolute paths."""
    return {
        name: str(Path(value).expanduser().resolve()) if name in PATH_OPTIONS and value else value
        for name, value in options.items()
    }


def save_state(
    folder: RunFolder,
    step: int,
    config: LoopConfig,
    optimizer: SaRAOptimizer,
    noise_generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    distributed: Distributed,
    data_fingerprint: str | None,
    ema: SparseEMA | None = None,
) -> None:
    """Write everything needed to continue after ``step`` to ``folder.state`` (atomically): the
    optimizer's state (SaRA's selection, values and Adam moments), the noise generator, the loss
    scaler and the EMA, with the step, options and data fingerprint as metadata."""
    state = {
        "optimizer": optimizer.state_dict(),
        "noise_generator": noise_generator.get_state(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
    }
    metadata = {
        "step": str(step),
        "config": json.dumps(comparable_options(config.to_dict())),
        "world_size": str(distributed.world),
    }
    if data_fingerprint is not None:
        metadata["data_fingerprint"] = data_fingerprint
    save_state_file(folder.state, state, metadata)


def saved_data_fingerprint(folder: RunFolder) -> str | None:
    """The data fingerprint a saved run recorded (read from the state file's header only), or None."""
    if not folder.state.exists():
        return None
    return read_safetensors_header(folder.state).metadata.get("data_fingerprint")


def data_changed_message(folder: RunFolder, data: str = "training data") -> str:
    return (
        f"--resume: the {data} changed since the run in {folder.root} was saved (images or captions differ); "
        f"resume with the same data or start a new run"
    )


def read_state(path: Path) -> tuple[dict, dict[str, str]]:
    """``(state, metadata)`` of a saved run; ``SaRAError`` if the file is missing, truncated, not
    safetensors or lacks the step, options, optimizer or noise generator."""
    state, metadata = read_state_file(path)
    try:
        int(metadata["step"]), int(metadata["world_size"]), json.loads(metadata["config"])
        state["optimizer"]["sara"], state["noise_generator"]
    except (KeyError, TypeError, ValueError) as error:
        raise SaRAError(
            f"--resume: the saved state {path} is damaged (no {error}); resume from an earlier copy or start a new run"
        ) from None
    return state, metadata


def resume_from(
    folder: RunFolder,
    config: LoopConfig,
    optimizer: SaRAOptimizer,
    noise_generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    distributed: Distributed,
    data_fingerprint: str | None,
    ema: SparseEMA | None = None,
) -> tuple[int, list[LossRow]]:
    """Load ``folder.state`` into the optimizer, generator and EMA; returns ``(step, loss rows so far)``.

    Refused (``SaRAError``) when the options that change the math differ, the training data
    changed (``data_fingerprint``), the process count differs, or the files are damaged."""
    state, metadata = read_state(folder.state)
    saved = json.loads(metadata["config"])
    current = comparable_options(config.to_dict())
    saved = comparable_options(saved) if isinstance(saved, dict) else {}
    # a run saved before an option existed ran with that option's default
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(config)
        if field.name not in saved and field.default is not dataclasses.MISSING
    }
    saved = {**defaults, **saved}
    differing = sorted(
        name for name, value in current.items() if name not in RESUME_INDEPENDENT and saved.get(name) != value
    )
    if differing:
        details = "; ".join(f"{name}: saved {saved.get(name)!r}, now {current[name]!r}" for name in differing)
        raise SaRAError(
            f"--resume: options differ from the saved run in {folder.root} ({details}); resume with the same options"
        )
    saved_data = metadata.get("data_fingerprint")
    if data_fingerprint is not None and saved_data is not None and saved_data != data_fingerprint:
        raise SaRAError(data_changed_message(folder))
    if int(metadata["world_size"]) != distributed.world:
        raise SaRAError(
            f"--resume: the run was saved with {metadata['world_size']} processes, now {distributed.world}"
        )
    step = int(metadata["step"])
    noise_generator.set_state(state["noise_generator"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    losses = [row for row in read_loss_log(folder.loss_csv) if row.step <= step]
    if len(losses) != step:
        raise SaRAError(
            f"--resume: {folder.loss_csv} has {len(losses)} rows up to step {step}; the run folder was changed by hand"
        )
    return step, losses
