"""The trainer loop on a real tiny diffusers UNet: it learns, logs, saves, and resumes bit-exactly."""

import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tiny_sd import TEXT_WIDTH, tiny_unet

from sara_train import SparseDelta
from sara_train.engine.config import SaRAConfig
from sara_train.engine.errors import SaRAError
from sara_train.engine.selection import budget_to_count, find_targets
from sara_train.families.sd_unet import full_resolution_modules
from sara_train.trainer.config import LoopConfig
from sara_train.trainer.logs import ValidationRow, read_loss_log, read_rows
from sara_train.trainer.loop import (
    Distributed,
    full_resolution_exclusions,
    learning_rate_at,
    micro_batch_loss,
    run_training,
)
from sara_train.trainer.objective import DenoisingObjective
from sara_train.trainer.types import PromptEmbedding, TrainingExample
from sara_train.trainer.validation import validation_loss, validation_set

CPU = torch.device("cpu")


def make_examples(count: int = 6) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(3)
    prompts = [PromptEmbedding(torch.randn(5, TEXT_WIDTH, generator=generator)) for _ in range(2)]
    return [TrainingExample(torch.randn(4, 8, 8, generator=generator), prompts[i % 2]) for i in range(count)]


def make_config(tmp_path: Path, **overrides) -> LoopConfig:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "steps": 8,
        "batch_size": 2,
        "grad_accumulation": 2,
        "learning_rate": 3e-3,
        "budget": 0.2,
        "rank_weight": 1e-3,
        "warmup_steps": 2,
        "lr_schedule": "cosine",
        "log_every": 3,
        "seed": 5,
    }
    return LoopConfig(**{**settings, **overrides})


def train(config: LoopConfig, **kwargs):
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return run_training(unet, scheduler, make_examples(), config, **kwargs), unet


def test_learning_rate_schedule() -> None:
    config = LoopConfig(steps=10, warmup_steps=2, lr_schedule="linear", learning_rate=1.0)
    assert [round(learning_rate_at(s, config), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    cosine = replace(config, lr_schedule="cosine", warmup_steps=0)
    assert learning_rate_at(0, cosine) == 1.0 and learning_rate_at(5, cosine) == pytest.approx(0.5)


def test_snr_gamma_weights_each_examples_error() -> None:
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch = make_examples(4)

    def loss(gamma: float) -> float:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return float(
                micro_batch_loss(
                    unet, DenoisingObjective(scheduler, gamma), batch, generator, Distributed(), 4, torch.float32, CPU
                )
            )

    generator = torch.Generator().manual_seed(1)  # the same draws, by hand
    latents = torch.stack([example.latents for example in batch])
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    hidden = torch.stack([example.prompt.hidden_states for example in batch])
    with torch.no_grad():
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    errors = (prediction - noise).pow(2).flatten(1).mean(1)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    assert loss(0.0) == pytest.approx(float(errors.mean()), rel=1e-5)
    gamma = float(snr.median())  # clips about half of the drawn timesteps
    assert loss(gamma) == pytest.approx(float((errors * snr.clamp(max=gamma) / snr).mean()), rel=1e-5)
    assert loss(gamma) < loss(0.0)  # the low-noise timesteps (SNR > gamma) count less


def test_caption_dropout_trains_the_seeded_share_with_the_empty_caption(tmp_path: Path) -> None:
    empty = PromptEmbedding(torch.zeros(5, TEXT_WIDTH))
    config = make_config(tmp_path, steps=30, grad_accumulation=1, batch_size=4, caption_dropout=0.25)
    with pytest.raises(SaRAError, match="caption-dropout needs the empty caption"):
        train(config)
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    seen: list[bool] = []

    def record(module, args, kwargs) -> None:
        states = kwargs["encoder_hidden_states"]
        seen.extend(bool(row.eq(0).all()) for row in states)

    unet.register_forward_pre_hook(record, with_kwargs=True)
    run_training(unet, DDPMScheduler(num_train_timesteps=1000), make_examples(), config, empty_prompt=empty)
    assert len(seen) == 120
    assert 0.15 < sum(seen) / len(seen) < 0.35  # 120 seeded Bernoulli(0.25) draws
    first, seen[:] = list(seen), []
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    unet.register_forward_pre_hook(record, with_kwargs=True)
    replay = replace(config, output_dir=str(tmp_path / "again"))
    run_training(unet, DDPMScheduler(num_train_timesteps=1000), make_examples(), replay, empty_prompt=empty)
    assert seen == first  # the same seed drops the same examples


def test_validation_loss_is_the_fixed_draw_error_of_the_model_as_it_is(tmp_path: Path) -> None:
    held_out = make_examples(8)[6:]
    config = make_config(tmp_path, validation_every=3, steps=7)
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    run_training(unet, scheduler, make_examples(), config, validation_examples=held_out)
    rows = read_rows(Path(config.output_dir) / "validation.csv", ValidationRow)
    assert [row.step for row in rows] == [3, 6, 7]  # every 3 steps and at the end
    assert rows[0].loss != rows[-1].loss
    # by hand, on the trained model: 4 evenly spread timesteps per example, noise from a generator seeded with the seed
    generator = torch.Generator().manual_seed(config.seed)
    errors = []
    unet.eval()
    with torch.no_grad():
        for example in held_out:
            for timestep in (125, 375, 625, 875):
                noise = torch.randn((1, *example.latents.shape), generator=generator)
                t = torch.tensor([timestep])
                noisy = scheduler.add_noise(example.latents[None], noise, t)
                prediction = unet(noisy, t, example.prompt.hidden_states[None]).sample
                errors.append(float((prediction - noise).pow(2).mean()))
    assert rows[-1].loss == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    objective = DenoisingObjective(scheduler)
    vset = validation_set(held_out, objective, config.seed)
    assert validation_loss(unet, objective, vset, torch.float32, CPU) == validation_loss(
        unet, objective, vset, torch.float32, CPU
    )  # deterministic


def test_tensorboard_holds_the_logged_scalars_and_samples(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, steps=4, log_with="tensorboard", validation_every=2, sample_every=2)
    torch.manual_seed(0)
    render = lambda step: [Image.new("RGB", (8, 8), "red")]
    result = run_training(
        tiny_unet("sd15"),
        DDPMScheduler(num_train_timesteps=1000),
        make_examples(),
        config,
        render_samples=render,
        validation_examples=make_examples(7)[6:],
    )
    events = EventAccumulator(str(Path(config.output_dir) / "tensorboard"), size_guidance={"images": 0}).Reload()
    logged = lambda tag: [(event.step, event.value) for event in events.Scalars(tag)]
    assert logged("loss") == [(row.step, pytest.approx(row.loss)) for row in result.losses]
    assert logged("learning_rate") == [(row.step, pytest.approx(row.learning_rate)) for row in result.losses]
    assert [step for step, _ in logged("rank_loss")] == [1, 2, 3, 4]
    validation = read_rows(Path(config.output_dir) / "validation.csv", ValidationRow)
    assert logged("validation_loss") == [(row.step, pytest.approx(row.loss)) for row in validation]
    assert [(image.step, image.width) for image in events.Images("samples")] == [(2, 8), (4, 8)]


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file: LevelDB-style log blocks of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config(tmp_path, steps=3, log_with="wandb")
    result, _ = train(config)
    (run_file,) = (Path(config.output_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [int(row["_step"]) for row in history] == [1, 2, 3]
    assert [float(row["loss"]) for row in history] == pytest.approx([row.loss for row in result.losses])


def test_run_writes_delta_logs_and_samples(tmp_path: Path) -> None:
    rendered = []

    def render(step: int) -> list[Image.Image]:
        rendered.append(step)
        return [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]

    config = make_config(tmp_path, save_every=4, sample_every=4, progressive_fraction=0.5)
    result, unet = train(config, render_samples=render, delta_metadata={"who": "test"})
    run = Path(config.output_dir)
    assert result.delta_path == run / "sara_delta.safetensors" and not result.interrupted
    delta = SparseDelta.load(result.delta_path)
    assert delta.metadata["who"] == "test" and delta.metadata["steps"] == "8"
    assert delta.num_entries > result.num_trainable > 0  # the progressive step froze some entries
    assert (run / "sara_delta_step000004.safetensors").exists()
    rows = read_loss_log(run / "loss.csv")
    assert [row.step for row in rows] == list(range(1, 9))
    assert rows[0].learning_rate == pytest.approx(1.5e-3) and rows[1].learning_rate == pytest.approx(3e-3)
    assert all(row.rank_loss > 0 for row in rows[1:])
    assert Image.open(run / "loss.png").size[0] > 300
    assert rendered == [4, 8] and Image.open(run / "samples" / "step000008.png").size == (16, 8)
    # the delta is exactly what the UNet learned: applying it to a fresh base gives the trained weights
    torch.manual_seed(0)
    fresh = tiny_unet("sd15")
    delta.to(torch.float32).apply_to(fresh)
    result.handle.remove(merge=True)
    for name, weight in fresh.state_dict().items():
        torch.testing.assert_close(weight, unet.state_dict()[name], rtol=0, atol=2e-3)


def test_loss_goes_down(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        steps=40,
        grad_accumulation=1,
        batch_size=6,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_schedule="constant",
        rank_weight=0.0,
        progressive_fraction=0.0,
    )
    result, _ = train(config)
    losses = [row.loss for row in result.losses]
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10


def interrupt_on_call(unet: torch.nn.Module, call: int) -> None:
    """Raise KeyboardInterrupt (as Ctrl-C would) when the UNet's forward is entered for the ``call``-th time."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt

    unet.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run the interrupted-and-resumed runs must reproduce exactly."""
    result, _ = train(make_config(tmp_path_factory.mktemp("uninterrupted"), progressive_fraction=0.5, ema_decay=0.9))
    return result


@pytest.mark.parametrize(
    "interrupt_call", [6, 9, 11]
)  # 2 micro-batches per step: mid-step 3 (first micro-batch), after step 4, mid-step 6 (second)
def test_ctrl_c_then_resume_is_bit_identical(tmp_path: Path, uninterrupted, interrupt_call: int) -> None:
    config = make_config(tmp_path, progressive_fraction=0.5, ema_decay=0.9)
    expected = uninterrupted

    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    interrupt_on_call(unet, interrupt_call)
    first = run_training(unet, DDPMScheduler(num_train_timesteps=1000), make_examples(), config)
    assert first.interrupted and len(first.losses) == (interrupt_call - 1) // 2
    assert SparseDelta.load(first.delta_path).metadata["steps"] == str(len(first.losses))
    with pytest.raises(SaRAError, match="already holds a run"):
        train(config)
    with pytest.raises(SaRAError, match="learning_rate: saved 0.003, now 0.004"):
        train(replace(config, resume=True, learning_rate=4e-3))

    resumed, _ = train(replace(config, resume=True))
    assert [row.loss for row in resumed.losses] == [row.loss for row in expected.losses]
    got, want = SparseDelta.load(resumed.delta_path), SparseDelta.load(expected.delta_path)
    assert got.layers.keys() == want.layers.keys()
    for name, layer in want.layers.items():
        assert torch.equal(got.layers[name].flat_indices, layer.flat_indices), name
        assert torch.equal(got.layers[name].values, layer.values), name
    ema_path = expected.delta_path.with_name("sara_delta_ema.safetensors")
    got_ema, want_ema = SparseDelta.load(Path(config.output_dir) / ema_path.name), SparseDelta.load(ema_path)
    assert want_ema.metadata["ema_updates"] == "8"
    for name, layer in want_ema.layers.items():
        assert torch.equal(got_ema.layers[name].values, layer.values), name  # the EMA resumed exactly too


def test_resume_without_state_is_explained(tmp_path: Path) -> None:
    with pytest.raises(SaRAError, match="no saved state"):
        train(make_config(tmp_path, resume=True))


def test_skip_full_resolution_trains_the_budget_on_the_other_layers(tmp_path: Path) -> None:
    full, _ = train(make_config(tmp_path / "all", steps=2))
    skipped, _ = train(make_config(tmp_path / "skip", steps=2, skip_full_resolution=True))
    unet = tiny_unet("sd15")  # the trained one is still injected
    patterns = full_resolution_modules(unet.config)
    every, fewer = SparseDelta.load(full.delta_path), SparseDelta.load(skipped.delta_path)
    assert any(any(re.search(p, key.removesuffix(".weight")) for p in patterns) for key in every.layers)
    assert not any(any(re.search(p, key.removesuffix(".weight")) for p in patterns) for key in fewer.layers)
    remaining = find_targets(unet, SaRAConfig(exclude=patterns))
    targeted = sum(getattr(t.module, t.param_name).numel() for t in remaining)
    assert sum(layer.numel for layer in fewer.layers.values()) == budget_to_count(0.2, targeted)  # of the rest


def test_skip_full_resolution_needs_a_unet(tmp_path: Path) -> None:
    with pytest.raises(SaRAError, match="--skip-full-resolution applies to Stable Diffusion UNets"):
        full_resolution_exclusions(torch.nn.Linear(2, 2), skip=True)
    assert full_resolution_exclusions(torch.nn.Linear(2, 2), skip=False) == []
