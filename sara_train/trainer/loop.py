"""The training loop: SaRA on a diffusers ``UNet2DConditionModel`` over cached examples.

One optimizer step, top to bottom (``run_training``):
  for each of ``grad_accumulation`` micro-batches: take the next ``batch_size * world`` examples in
  the seeded order, draw noise and timesteps for all of them from one CPU generator, keep this
  process's slice, noise the latents (DDPM), predict with the UNet, MSE against the scheduler's
  target (noise, velocity or sample), backward (gradients reach only the sparse SaRA values);
  then average the values' gradients over processes, set the learning rate, ``SaRAAdamW.step()``
  (which adds the rank-loss gradient and does the progressive re-selection on its step).
Everything random is a function of ``config.seed`` and the step, or lives in the saved generator
state, so ``--resume`` continues bit-identically. Processes are never wrapped in DDP: the SaRA
values are the only trainable tensors and are all-reduced by hand, which survives re-selection.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import SaRAConfig
from ..delta import SparseDelta
from ..errors import SaRAError
from ..files import atomic_output
from ..optim import SaRAAdamW
from ..train_state import load_training_state, training_state_tensors
from .config import TrainConfig
from .logs import LossRow, plot_loss, read_loss_log, write_loss_log
from .types import TrainingExample

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESUME_INDEPENDENT = {"output_dir", "resume", "save_every", "log_every", "sample_every", "sample_prompts",
                      "sample_steps", "sample_guidance", "sample_seed", "cache_dir", "cache", "delta_dtype",
                      "key_format", "base_config", "device"}
"""Options that may differ between a run and its resumption (they do not change the math)."""


@dataclass
class TrainResult:
    """What a run produced. ``delta_path`` is the final (or last, if interrupted) delta file."""

    delta_path: Path
    losses: list[LossRow]
    num_trainable: int
    interrupted: bool


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


def learning_rate_at(step: int, config: TrainConfig) -> float:
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


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``prediction_type`` (epsilon, v_prediction or sample)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise SaRAError(f"unsupported scheduler prediction_type {prediction_type!r}")


class Distributed:
    """This process's place among the training processes (one process when not launched by
    ``accelerate launch`` / ``torchrun``)."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over processes in place (one flat all-reduce)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def run_training(unet: nn.Module, noise_scheduler, examples: Sequence[TrainingExample], config: TrainConfig,
                 render_samples: Callable[[int], list[Image.Image]] | None = None,
                 delta_metadata: dict[str, str] | None = None,
                 convert_delta: Callable[[SparseDelta], SparseDelta] | None = None) -> TrainResult:
    """Fine-tune ``unet`` in place with SaRA on ``examples``; write the run's files; return the result.

    ``unet``: a diffusers ``UNet2DConditionModel`` (or any module with its call signature), on the
    device to train on, fp32. ``noise_scheduler``: a ``DDPMScheduler`` (its ``num_train_timesteps``
    and ``prediction_type`` are used). ``render_samples(step)`` makes validation images with the
    UNet as it is (rank 0 only). ``convert_delta`` renames delta keys before saving (e.g. to LDM
    names). On return (or Ctrl-C, which saves and returns ``interrupted=True``) the UNet still
    holds SaRA's parametrization with the learned values; the caller may ``remove()`` it via the
    handle in ``unet.sara_handle``.
    """
    config.validate()
    if not examples:
        raise SaRAError("no training examples")
    distributed = Distributed()
    folder = RunFolder(Path(config.output_dir))
    device = next(unet.parameters()).device
    compute_dtype = DTYPES[config.mixed_precision]
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise SaRAError("--mixed-precision fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    if next(unet.parameters()).dtype != compute_dtype:
        unet.to(compute_dtype)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if not config.resume and folder.state.exists():
        raise SaRAError(f"{folder.root} already holds a run (state in {folder.state}); pass --resume to continue "
                        f"it or choose another --output-dir")
    selection = SaRAConfig(threshold=config.threshold, budget=config.budget, include=list(config.include),
                           exclude=list(config.exclude))
    optimizer = SaRAAdamW(unet, lr=config.learning_rate, config=selection, rank_weight=config.rank_weight,
                          rank_layers_per_step=config.rank_layers_per_step, progressive_at=config.progressive_at,
                          weight_decay=config.weight_decay)
    unet.sara_handle = optimizer.handle
    scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
    noise_generator = torch.Generator().manual_seed(config.seed)
    start_step, losses = 0, []
    if config.resume:
        start_step, losses = resume_from(folder, config, optimizer, noise_generator, scaler, distributed)
    metadata = {"trainer": "sara-train", "config": json.dumps(config.to_dict()), **(delta_metadata or {})}

    def save(step: int, final: bool) -> Path:
        delta = optimizer.handle.delta(metadata={**metadata, "steps": str(step)})
        if convert_delta is not None:
            delta = convert_delta(delta)
        path = delta.save(folder.delta if final else folder.delta_at(step), dtype=DTYPES[config.delta_dtype])
        save_state(folder, step, config, optimizer, noise_generator, scaler, distributed)
        write_logs(folder, losses)
        return path

    progress = tqdm(total=config.steps, initial=start_step, desc="SaRA", unit="step", disable=not distributed.is_main,
                    dynamic_ncols=True)
    started = time.monotonic() - (losses[-1].seconds if losses else 0.0)
    global_batch = config.batch_size * distributed.world
    completed = step = start_step
    generator_at_step_start = noise_generator.get_state()
    try:
        for step in range(start_step, config.steps):
            generator_at_step_start = noise_generator.get_state()
            torch.manual_seed(config.seed * 7919 + step)  # any global-RNG use (dropout) is a function of the step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, config)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for micro in range(config.grad_accumulation):
                first = (step * config.grad_accumulation + micro) * global_batch
                indices = [example_order(first + i, len(examples), config.seed) for i in range(global_batch)]
                loss = micro_batch_loss(unet, noise_scheduler, [examples[i] for i in indices], noise_generator,
                                        distributed, config.batch_size, compute_dtype, device)
                backward(loss / config.grad_accumulation, scaler)
                loss_sum += loss.detach().double().cpu()
            gradients = [p.grad for p in optimizer.handle.parameters() if p.grad is not None]
            distributed.average_(gradients)
            mean_loss = loss_sum / config.grad_accumulation
            distributed.average_([mean_loss])
            if scaler is not None:
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = completed = step + 1
            losses.append(LossRow(done, float(mean_loss), optimizer.last_rank_loss, learning_rate_at(step, config),
                                  round(time.monotonic() - started, 3)))
            if not math.isfinite(float(mean_loss)):
                raise SaRAError(f"the loss became {float(mean_loss)} at step {done}: lower --learning-rate or "
                                f"use --mixed-precision bf16/no")
            progress.update(1)
            progress.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{learning_rate_at(step, config):.2e}")
            if distributed.is_main:
                if done % config.log_every == 0:
                    write_logs(folder, losses)
                if config.save_every and done % config.save_every == 0 and done < config.steps:
                    save(done, final=False)
                if render_samples and config.sample_every and done % config.sample_every == 0 and done < config.steps:
                    save_samples(folder.samples_at(done), unet, render_samples, done)
    except KeyboardInterrupt:
        progress.close()
        if completed == step:  # interrupted inside a step: drop it, and its random draws
            noise_generator.set_state(generator_at_step_start)
            optimizer.zero_grad(set_to_none=True)
        path = save(completed, final=False) if distributed.is_main else folder.delta_at(completed)
        return TrainResult(path, losses, optimizer.handle.num_trainable, interrupted=True)
    progress.close()
    path = folder.delta
    if distributed.is_main:
        path = save(config.steps, final=True)
        if render_samples:
            save_samples(folder.samples_at(config.steps), unet, render_samples, config.steps)
    distributed.barrier()
    return TrainResult(path, losses, optimizer.handle.num_trainable, interrupted=False)


def micro_batch_loss(unet: nn.Module, noise_scheduler, batch: Sequence[TrainingExample],
                     noise_generator: torch.Generator, distributed: Distributed, per_process: int,
                     compute_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Denoising MSE of this process's slice of the global micro-batch ``batch`` (0-d fp32 tensor)."""
    latents = torch.stack([example.latents for example in batch]).float()
    noise = torch.randn(latents.shape, generator=noise_generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=noise_generator)
    mine = slice(distributed.rank * per_process, (distributed.rank + 1) * per_process)
    latents, noise, timesteps = latents[mine].to(device), noise[mine].to(device), timesteps[mine].to(device)
    batch = batch[mine]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    hidden_states = torch.stack([example.prompt.hidden_states for example in batch]).to(device, compute_dtype)
    added_conditions = None
    if batch[0].prompt.pooled is not None:
        added_conditions = {
            "text_embeds": torch.stack([example.prompt.pooled for example in batch]).to(device, compute_dtype),
            "time_ids": torch.stack([example.time_ids for example in batch]).to(device, compute_dtype)}
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        prediction = unet(noisy.to(compute_dtype), timesteps, encoder_hidden_states=hidden_states,
                          added_cond_kwargs=added_conditions).sample
    return nn.functional.mse_loss(prediction.float(), target.float())


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def write_logs(folder: RunFolder, losses: list[LossRow]) -> None:
    write_loss_log(folder.loss_csv, losses)
    if losses:
        plot_loss(folder.loss_png, losses)


def save_samples(path: Path, unet: nn.Module, render_samples: Callable[[int], list[Image.Image]], step: int) -> None:
    """Render the validation images with the UNet in eval mode and save them side by side."""
    unet.eval()
    try:
        with torch.no_grad():
            images = render_samples(step)
    finally:
        unet.train()
    width = sum(image.width for image in images)
    grid = Image.new("RGB", (width, max(image.height for image in images)), "white")
    x = 0
    for image in images:
        grid.paste(image.convert("RGB"), (x, 0))
        x += image.width
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        grid.save(temp, format="PNG")


def save_state(folder: RunFolder, step: int, config: TrainConfig, optimizer: SaRAAdamW,
               noise_generator: torch.Generator, scaler: torch.amp.GradScaler | None,
               distributed: Distributed) -> None:
    """Write everything needed to continue after ``step`` to ``folder.state`` (atomically)."""
    tensors = training_state_tensors(optimizer)
    tensors["::noise_generator"] = noise_generator.get_state()
    metadata = {"step": str(step), "config": json.dumps(config.to_dict()), "world_size": str(distributed.world)}
    if scaler is not None:
        metadata["grad_scaler"] = json.dumps({k: float(v) if torch.is_tensor(v) else v
                                              for k, v in scaler.state_dict().items()})
    folder.state.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder.state) as temp:
        save_file(tensors, str(temp), metadata=metadata)


def resume_from(folder: RunFolder, config: TrainConfig, optimizer: SaRAAdamW, noise_generator: torch.Generator,
                scaler: torch.amp.GradScaler | None, distributed: Distributed) -> tuple[int, list[LossRow]]:
    """Load ``folder.state`` into the optimizer and generator; returns ``(step, loss rows so far)``."""
    if not folder.state.exists():
        raise SaRAError(f"--resume: no saved state in {folder.root} (expected {folder.state}); a run saves it at "
                        f"--save-every steps, on Ctrl-C and at the end")
    with safe_open(str(folder.state), "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    saved = json.loads(metadata["config"])
    differing = sorted(name for name, value in config.to_dict().items()
                       if name not in RESUME_INDEPENDENT and saved.get(name) != value)
    if differing:
        details = "; ".join(f"{name}: saved {saved.get(name)!r}, now {getattr(config, name)!r}" for name in differing)
        raise SaRAError(f"--resume: options differ from the saved run in {folder.root} ({details}); resume with "
                        f"the same options")
    if int(metadata["world_size"]) != distributed.world:
        raise SaRAError(f"--resume: the run was saved with {metadata['world_size']} processes, now {distributed.world}")
    step = int(metadata["step"])
    noise_generator.set_state(tensors.pop("::noise_generator"))
    load_training_state(optimizer, tensors, where=str(folder.state))
    if scaler is not None and "grad_scaler" in metadata:
        scaler.load_state_dict(json.loads(metadata["grad_scaler"]))
    losses = [row for row in read_loss_log(folder.loss_csv) if row.step <= step]
    if len(losses) != step:
        raise SaRAError(f"--resume: {folder.loss_csv} has {len(losses)} rows up to step {step}; the run folder "
                        f"was changed by hand")
    return step, losses
