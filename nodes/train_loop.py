"""The SaRA training loop, run as a ComfyUI sampler so it works for every model type ComfyUI loads.

``CFGGuider.sample`` loads the model, prepares the conditioning for the model type and calls
``SaRATrainSampler.sample``. There, SaRA is injected into the loaded diffusion model in place
(ComfyUI model clones share one module), each step draws timestep fractions u (uniform,
logit-normal or mode: ``sara_train.trainer.timesteps``) and maps them to sigmas with
``model_sampling.percent_to_sigma(1 - u)`` (which applies the model's own shift), noises latents
with ``model_sampling.noise_scaling``, predicts the clean latent through the guider (ComfyUI's
model wrapper) and takes the MSE in the model's own output space (``x0_per_model_output``),
optionally weighted by min-SNR-γ. Afterwards the learned update (and its EMA) is taken as a
``SparseDelta`` and the shared weights are restored bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import torch
import torch.utils.checkpoint
from torch import nn

import sara_train
from sara_train import SaRAConfig, SparseDelta
from sara_train.engine.inplace import out_of_place_augmented_assignments
from sara_train.trainer.timesteps import TimestepSampling, draw_fractions, snr_weights

from .train_data import Bucket, TrainingSet

PERCENT_MARGIN = 1e-4
"""Sigma percentiles are drawn from [m, 1 - m]: percent 0 maps to an 'infinite' sigma in ComfyUI."""


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    grad_accumulation: int
    learning_rate: float
    selection: SaRAConfig
    rank_weight: float
    rank_layers_per_step: int
    progressive_at: int | None
    """Optimizer step after which the trainable entries are re-selected (None: never)."""
    seed: int
    autocast_dtype: torch.dtype | None
    """Mixed-precision dtype (None: train in the model's own precision)."""
    gradient_checkpointing: bool
    existing: SparseDelta | None = None
    """A delta to continue from: added to the weights first and included in the result."""
    timestep_sampling: TimestepSampling = "uniform"
    """How the noise levels are drawn (the model's shift is applied by its ``percent_to_sigma``)."""
    min_snr_gamma: float = 0.0
    """Min-SNR-γ loss weighting for ε/v/x₀-prediction models (0: off)."""
    caption_dropout: float = 0.0
    """Probability that an image trains with the dropout conditioning instead of its own."""
    ema_decay: float = 0.0
    """Decay of the sparse EMA of the learned update (0: no EMA)."""


@dataclass
class TrainOutcome:
    delta: SparseDelta
    """Everything learned (including ``existing``), values fp32, keys relative to the diffusion model."""
    losses: list[float]
    """One per optimizer step taken."""
    cancelled: bool
    num_trainable: int
    stopped_early: str | None = None
    """Why training ended before ``steps`` without a cancel (the progressive step froze every entry)."""
    ema_delta: SparseDelta | None = None
    """The EMA of the learned update (including ``existing``) when ``ema_decay`` > 0."""
    captions_dropped: int = 0
    """Images that trained with the dropout conditioning."""
    images_drawn: int = 0
    """Images drawn in all micro-batches."""

    @property
    def steps_done(self) -> int:
        return len(self.losses)


@dataclass
class StepReport:
    step: int
    loss: float
    current_delta: Callable[[], SparseDelta]
    """Builds the delta learned so far (costs a copy of the values; call it only to save)."""
    current_ema_delta: Callable[[], SparseDelta] | None = None
    """Builds the EMA delta so far (None without EMA)."""


@dataclass
class SaRATrainSampler(comfy.samplers.Sampler):
    """A ``comfy.samplers.Sampler`` whose ``sample`` trains instead of sampling.

    ``conditioning_slices[i]`` is the slice of the guider's flat positive conditioning that
    belongs to ``data.conditionings[i]``; ``dropout_slice`` that of ``data.dropout_conditioning``,
    which a dropped caption trains with. ``on_step(report)`` runs after every optimizer step;
    ``should_stop()`` before every step (the Cancel button). The result is in ``outcome``.
    """

    data: TrainingSet
    settings: TrainSettings
    conditioning_slices: list[slice]
    dropout_slice: slice
    on_step: Callable[[StepReport], None]
    should_stop: Callable[[], bool]
    outcome: TrainOutcome | None = field(default=None, init=False)
    captions_dropped: int = field(default=0, init=False)
    images_drawn: int = field(default=0, init=False)

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        base_model = model_wrap.inner_model
        network: nn.Module = base_model.diffusion_model
        device = next(network.parameters()).device
        buckets = [
            Bucket(base_model.process_latent_in(b.latents.to(device)), b.conditioning_ids) for b in self.data.buckets
        ]
        all_conds = model_wrap.conds["positive"]
        expected = self.dropout_slice.stop  # the dropout conditioning comes last
        if len(all_conds) != expected:
            raise RuntimeError(f"ComfyUI prepared {len(all_conds)} conditioning entries, expected {expected}")
        if self.settings.min_snr_gamma:
            prediction_type_of(base_model.model_sampling)  # refuses flow models before any step
        with contextlib.ExitStack() as cleanup:
            make_trainable_tensors(network)
            existing = self.settings.existing
            if existing is not None:  # in the network's own names, whatever naming the file used
                existing = existing.fit(network)
                cleanup.callback(existing.apply_to(network).restore)
            optimizer = sara_train.SaRAAdamW(  # on failure it leaves the shared network as it was
                network,
                lr=self.settings.learning_rate,
                config=selection_for(network, self.settings.selection, self.settings.autocast_dtype),
                rank_weight=self.settings.rank_weight,
                rank_layers_per_step=self.settings.rank_layers_per_step,
                progressive_at=self.settings.progressive_at,
            )
            handle = optimizer.handle
            cleanup.callback(handle.remove, merge=False)
            if self.settings.gradient_checkpointing:
                cleanup.enter_context(checkpointed_blocks(network))

            ema = sara_train.SparseEMA(handle, self.settings.ema_decay) if self.settings.ema_decay else None

            def with_existing(learned: SparseDelta) -> SparseDelta:
                return learned if existing is None else SparseDelta.stack([existing, learned], check_base=False)

            def current_delta() -> SparseDelta:
                return with_existing(handle.delta())

            def current_ema_delta() -> SparseDelta:
                return with_existing(ema.delta())

            generator = torch.Generator().manual_seed(self.settings.seed)
            losses: list[float] = []
            cancelled = False
            stopped_early = None
            try:
                for step in range(1, self.settings.steps + 1):
                    if self.should_stop():
                        cancelled = True
                        break
                    try:
                        loss = (
                            sum(
                                self._micro_batch(model_wrap, extra_args, buckets, all_conds, generator)
                                for _ in range(self.settings.grad_accumulation)
                            )
                            / self.settings.grad_accumulation
                        )
                    except comfy.model_management.InterruptProcessingException:
                        # Cancel seen by ComfyUI's layers mid-step (they check on every op): drop this step.
                        optimizer.zero_grad(set_to_none=True)
                        cancelled = True
                        break
                    if not math.isfinite(loss):
                        raise ValueError(
                            f"the training loss became {loss} at step {step}; lower the learning "
                            "rate or check the training data"
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update()
                    losses.append(loss)
                    self.on_step(StepReport(step, loss, current_delta, current_ema_delta if ema else None))
                    if handle.num_trainable == 0:
                        stopped_early = (
                            f"the progressive step after step {step} left no entry trainable (every "
                            f"learned |value| reached the threshold {handle.threshold:.3g})"
                        )
                        break
            finally:
                model_wrap.conds["positive"] = all_conds
            self.outcome = TrainOutcome(
                current_delta(),
                losses,
                cancelled,
                handle.num_trainable,
                stopped_early,
                current_ema_delta() if ema is not None and ema.updates else None,
                self.captions_dropped,
                self.images_drawn,
            )
        return torch.zeros_like(latent_image)

    def _micro_batch(
        self, model_wrap, extra_args, buckets: list[Bucket], all_conds: list, generator: torch.Generator
    ) -> float:
        """Forward and backward one batch (scaled for accumulation); returns its mean loss.

        Draws from ``generator``, in order: the bucket, its rows, their timestep fractions, their
        noise, and one caption-dropout number per row (drawn at every rate, so the other draws do
        not depend on it)."""
        settings = self.settings
        sizes = torch.tensor([len(b.conditioning_ids) for b in buckets], dtype=torch.float)
        bucket = buckets[int(torch.multinomial(sizes, 1, generator=generator))]
        rows = torch.randperm(len(bucket.conditioning_ids), generator=generator)[: settings.batch_size]
        model_sampling = model_wrap.inner_model.model_sampling
        fractions = draw_fractions(settings.timestep_sampling, len(rows), generator)
        percents = (1 - fractions).clamp(PERCENT_MARGIN, 1 - PERCENT_MARGIN)
        device = bucket.latents.device
        sigma = torch.tensor([float(model_sampling.percent_to_sigma(float(p))) for p in percents], device=device)
        noise = torch.randn((len(rows), *bucket.latents.shape[1:]), generator=generator).to(device)
        dropped = torch.rand(len(rows), generator=generator) < settings.caption_dropout
        clean = bucket.latents[rows.to(device)]
        noisy = model_sampling.noise_scaling(sigma, noise, clean, False)
        target = model_sampling.noise_scaling(torch.zeros_like(sigma), torch.zeros_like(noise), clean, False)
        output_scale = x0_per_model_output(model_sampling, sigma, clean)
        weights = torch.ones(len(rows), device=device)
        if settings.min_snr_gamma:
            snr = getattr(model_sampling, "sigma_data", 1.0) ** 2 / sigma.double() ** 2
            weights = snr_weights(snr, settings.min_snr_gamma, prediction_type_of(model_sampling)).to(device)
        self.images_drawn += len(rows)
        self.captions_dropped += int(dropped.sum())

        total = 0.0
        slices = [*self.conditioning_slices, self.dropout_slice]  # a dropped caption's conditioning: -1
        groups: dict[int, list[int]] = {}
        for position, (row, drop) in enumerate(zip(rows.tolist(), dropped.tolist())):
            groups.setdefault(-1 if drop else bucket.conditioning_ids[row], []).append(position)
        for conditioning_id, positions in groups.items():
            model_wrap.conds["positive"] = all_conds[slices[conditioning_id]]
            index = torch.tensor(positions, device=device)
            dtype = settings.autocast_dtype
            with (
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
                out_of_place_augmented_assignments(),
            ):
                prediction = model_wrap(noisy[index], sigma[index], **extra_args)
            errors = ((prediction.float() - target[index].float()) / output_scale[index]).square()
            loss = (errors.flatten(1).mean(1) * weights[index]).mean()
            share = len(positions) / len(rows)
            (loss * (share / settings.grad_accumulation)).backward()
            total += float(loss.detach()) * share
        return total


def prediction_type_of(model_sampling) -> str:
    """The min-SNR prediction type of a ComfyUI ``model_sampling`` ("epsilon", "v_prediction" or
    "sample"); ``ValueError`` for flow-matching and EDM models, where min-SNR-γ does not apply."""
    kinds = comfy.model_sampling
    if not isinstance(model_sampling, kinds.EDM):
        for kind, name in ((kinds.X0, "sample"), (kinds.V_PREDICTION, "v_prediction"), (kinds.EPS, "epsilon")):
            if isinstance(model_sampling, kind):
                return name
    raise ValueError(
        f"min-SNR weighting is for epsilon-, v- and x0-prediction models; this model samples with "
        f"{type(model_sampling).__name__} (flow matching or EDM): set min_snr_gamma to 0 or use "
        "timestep_sampling instead"
    )


def selection_for(network: nn.Module, selection: SaRAConfig, autocast_dtype: torch.dtype | None) -> SaRAConfig:
    """``selection``, in the overlay mode (``SaRAConfig.overlay_dtype``) when some weight is stored in
    fewer bits than the training computes in (fp8 storage, or bf16/fp16 storage trained in fp32):
    the update and its gradient then stay in the compute dtype and the stored weights are never
    written. Otherwise the exact in-place mode."""
    compute = autocast_dtype or torch.float32
    stored = {param.dtype for param in network.parameters() if param.is_floating_point()}
    if any(torch.finfo(dtype).bits < torch.finfo(compute).bits for dtype in stored):
        return dataclasses.replace(selection, overlay_dtype=compute)
    return selection


@torch.no_grad()
def make_trainable_tensors(root: nn.Module) -> None:
    """Replace ``root``'s inference-mode parameters and buffers by normal copies, one at a time.

    ComfyUI loads models under ``torch.inference_mode``; such tensors can neither be
    parametrized nor saved for backward. The copies hold the same values, so every clone of the
    ComfyUI model sharing this module is unaffected.
    """
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_inference():
                    copy = tensor.clone()
                    store[name] = (
                        nn.Parameter(copy, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy
                    )


def x0_per_model_output(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """|d x0 / d model output| at each ``sigma`` (shape ``[b, 1, ...]``, broadcastable to ``like``).

    ComfyUI's denoised prediction is ``a(σ)·x_t - c(σ)·output`` for every parameterization (eps:
    c = σ; v: c = σ·σ_d/√(σ²+σ_d²); flow: c = σ). Dividing the x0 error by c gives the MSE in the
    model's own output space (the usual eps/v/velocity loss), whose scale does not swing with σ.
    """
    ones = torch.ones((len(sigma), *like.shape[1:]), device=like.device)
    scale = model_sampling.calculate_denoised(sigma, ones, torch.zeros_like(ones)).abs()
    return scale.amax(dim=tuple(range(1, scale.ndim)), keepdim=True).clamp_min(1e-6)


def outermost_blocks(root: nn.Module) -> list[nn.Module]:
    """The highest submodules of ``root`` that are not plain containers (ModuleList, Sequential,
    ModuleDict): the units gradient checkpointing wraps."""
    blocks = []
    for child in root.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            blocks.extend(outermost_blocks(child))
        else:
            blocks.append(child)
    return blocks


@contextlib.contextmanager
def checkpointed_blocks(root: nn.Module) -> Iterator[None]:
    """Run each outermost block's forward under ``torch.utils.checkpoint`` (non-reentrant) while
    inside; the blocks' own ``forward`` is restored on exit."""
    blocks = outermost_blocks(root)
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _checkpointed(forward: Callable, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(_out_of_place, forward, *args, use_reentrant=False, **kwargs)


def _out_of_place(forward: Callable, *args, **kwargs):
    """``forward`` with augmented assignments made out of place, also when checkpointing recomputes it."""
    with out_of_place_augmented_assignments():
        return forward(*args, **kwargs)


class CancelWatch:
    """Turns ComfyUI's Cancel button into a clean stop. The interrupt flag is consumed here (so
    nodes after SaRA Train still run with what was learned), whether it is seen directly or by
    the progress-bar hook, which would otherwise raise out of the training loop."""

    def __init__(self, total_steps: int, node_id: str | None) -> None:
        self.progress_bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.cancelled = False

    def requested(self) -> bool:
        if comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            self.cancelled = True
        return self.cancelled

    def progress(self, step: int) -> None:
        try:
            self.progress_bar.update_absolute(step)
        except comfy.model_management.InterruptProcessingException:
            self.cancelled = True
