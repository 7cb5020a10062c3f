"""`sara-train train` on the flow-matching families, SD3/3.5 and Flux.1, with tiny pipelines built
locally: the objective against diffusers' own scheduler and packing, then the CLI end to end (original
naming with fused q/k/v, samples, validation, EMA), a bit-identical resume after Ctrl-C, and a merge into
the single transformer file it was trained from that equals base + delta."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image
from safetensors.torch import load_file
from tiny_dit import original_state, write_original_transformer_file, write_tiny_flux_pipeline, write_tiny_sd3_pipeline
from train_cli import REPO, assert_identical, read_delta, sara_train_cli, train_args

from sara_train.engine.errors import SaRAError
from sara_train.families import flux, sd3
from sara_train.trainer.base_model import load_base
from sara_train.trainer.logs import ValidationRow, read_loss_log, read_rows
from sara_train.trainer.objective import FlowMatchingObjective
from sara_train.trainer.types import PromptEmbedding, TrainingExample

FAMILIES = {
    "sd3": (write_tiny_sd3_pipeline, sd3.NAMING, "SD3Transformer2DModel", "joint_blocks.0.x_block.attn.qkv.weight"),
    "flux": (write_tiny_flux_pipeline, flux.NAMING, "FluxTransformer2DModel", "double_blocks.0.img_attn.qkv.weight"),
}
FEATURES = (
    "--text-tokens",
    "32",
    "--timestep-sampling",
    "logit_normal",
    "--validation-split",
    "0.25",
    "--ema-decay",
    "0.9",
    "--caption-dropout",
    "0.3",
    "--save-every",
    "2",
    "--sample-prompts",
    "a red disc",
    "--sample-steps",
    "2",
)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow_pipelines")
    return {family: write(root / family) for family, (write, *_) in FAMILIES.items()}


@pytest.fixture(scope="module")
def full_runs(pipelines: dict[str, Path], image_folder: Path, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted CLI run per family: its output folder."""
    runs = {}
    for family, base in pipelines.items():
        out = tmp_path_factory.mktemp("flow_runs") / family
        result = sara_train_cli(*train_args(base, image_folder, out, *FEATURES))
        assert result.returncode == 0, result.stderr
        runs[family] = out
    return runs


def test_sd3_sigmas_are_the_schedulers() -> None:
    """SD3's fixed shift: σ(u) equals FlowMatchEulerDiscreteScheduler's shifted sigmas on its grid."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatchingObjective("sd3", dict(scheduler.config))
    u = torch.arange(1000, 0, -1) / 1000
    torch.testing.assert_close(objective.sigmas(u, 64, 64), scheduler.sigmas.float())


def test_flux_shift_is_the_pipelines_for_the_resolution() -> None:
    """Flux's dynamic shift: σ(u) for 64x64 and 128x128 latents equals the sampling schedule the
    pipeline sets for that many image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}
    config |= {"base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000}
    objective = FlowMatchingObjective("flux", config)
    for side in (64, 128):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        u = torch.linspace(1.0, 1 / 20, 20)
        scheduler.set_timesteps(sigmas=u.numpy(), mu=calculate_shift((side // 2) ** 2))
        torch.testing.assert_close(objective.sigmas(u, side, side), scheduler.sigmas[:-1].float())
    assert objective.sigmas(torch.tensor([0.5]), 128, 128) > objective.sigmas(torch.tensor([0.5]), 64, 64)
    assert FlowMatchingObjective("flux", config, shift=1.0).sigmas(torch.tensor([0.3]), 128, 128) == pytest.approx(0.3)


def test_timestep_sampling_shapes_the_draws() -> None:
    """Seeded draws: logit-normal concentrates mid-schedule, mode sampling with a positive scale too,
    uniform spreads evenly; all in [0, 1]."""
    middle = {}
    for sampling in ("uniform", "logit_normal", "mode"):
        objective = FlowMatchingObjective("sd3", {"num_train_timesteps": 1000, "shift": 1.0}, sampling)
        draws = objective.draw_timesteps(4000, torch.Generator().manual_seed(0))
        assert draws.shape == (4000,) and draws.min() >= 0 and draws.max() <= 1
        middle[sampling] = float(((draws > 0.25) & (draws < 0.75)).float().mean())
    assert middle["uniform"] == pytest.approx(0.5, abs=0.03)
    assert middle["logit_normal"] > 0.6 and middle["mode"] > 0.55


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_loss_is_the_velocity_error_by_hand(pipelines: dict[str, Path], family: str) -> None:
    """The per-example error equals the transformer's velocity error computed by hand; for Flux with
    the pipeline's own packing, image ids and the guidance input."""
    base = load_base(pipelines[family], text_tokens=32)
    transformer = base.denoiser.eval()
    objective = base.objective(guidance=3.5 if family == "flux" else 1.0)
    prompts = base.encode_prompts(["a red disc", "a blue disc"])
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 8, 8)
    batch = [TrainingExample(latents[i], PromptEmbedding(p.hidden_states, p.pooled)) for i, p in enumerate(prompts)]
    noise, u = torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        errors = objective.example_errors(transformer, batch, noise, u, torch.float32, torch.device("cpu"))
        sigma = objective.sigmas(u, 8, 8).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        states = torch.stack([p.hidden_states for p in prompts])
        pooled = torch.stack([p.pooled for p in prompts])
        if family == "sd3":
            prediction = transformer(noisy, states, pooled, sigma.flatten() * 1000).sample
        else:
            packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 8)
            image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
            prediction = transformer(
                packed,
                encoder_hidden_states=states,
                pooled_projections=pooled,
                timestep=sigma.flatten(),
                img_ids=image_ids,
                txt_ids=torch.zeros(states.shape[1], 3),
                guidance=torch.full((2,), 3.5),
            ).sample
            prediction = FluxPipeline._unpack_latents(prediction, 16, 16, 2)  # 16 px = 8 latents at VAE factor 2
    expected = (prediction - (noise - latents)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(errors, expected)


def test_family_options_are_checked(pipelines: dict[str, Path], tiny_base: Path) -> None:
    flux_base, sd_base = load_base(pipelines["flux"]), load_base(tiny_base)
    with pytest.raises(SaRAError, match="--snr-gamma weights ε/v-prediction losses"):
        flux_base.objective(snr_gamma=5.0)
    with pytest.raises(SaRAError, match="--timestep-sampling: for flow-matching bases"):
        sd_base.objective(sampling="logit_normal")
    with pytest.raises(SaRAError, match="has no guidance input"):
        load_base(pipelines["sd3"]).objective(guidance=3.5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_train_writes_a_complete_run(full_runs: dict[str, Path], family: str) -> None:
    out = full_runs[family]
    fused = FAMILIES[family][3]
    delta = read_delta(out / "sara_delta.safetensors")
    assert delta.metadata["base_kind"] == family and delta.metadata["steps"] == "6"
    assert fused in delta.layers, "the original (ComfyUI, single-file) naming: q, k and v fused"
    assert not any("to_q" in key for key in delta.layers)
    ema = read_delta(out / "sara_delta_ema.safetensors")
    assert ema.layers.keys() == delta.layers.keys() and ema.metadata["ema_updates"] == "6"
    assert [row.step for row in read_rows(out / "validation.csv", ValidationRow)] == [6]
    losses = read_loss_log(out / "loss.csv")
    assert [row.step for row in losses] == [1, 2, 3, 4, 5, 6] and all(0 < row.loss < 10 for row in losses)
    assert Image.open(out / "samples" / "step000006.png").size == (32, 32)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_resume_after_ctrl_c_is_bit_identical(
    full_runs: dict[str, Path], pipelines: dict[str, Path], image_folder: Path, tmp_path: Path, family: str
) -> None:
    """SIGINT in the transformer's forward of step 4: step 3 is saved; resuming ends bit-identical
    (delta, EMA, losses, validation) to the uninterrupted run."""
    out = tmp_path / "interrupted"
    args = train_args(pipelines[family], image_folder, out, *FEATURES)
    injected = [sys.executable, str(REPO / "tests" / "inject_signal.py")]
    injected += [f"diffusers:{FAMILIES[family][2]}.forward", "4", "SIGINT", "--", *args]
    interrupted = subprocess.run(
        injected, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert "saved step 3 of 6" in interrupted.stderr
    resumed = sara_train_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    reference = full_runs[family]
    for name in ("sara_delta.safetensors", "sara_delta_ema.safetensors"):
        assert_identical(read_delta(out / name), read_delta(reference / name))
    assert [r.loss for r in read_loss_log(out / "loss.csv")] == [r.loss for r in read_loss_log(reference / "loss.csv")]
    assert read_rows(out / "validation.csv", ValidationRow) == read_rows(reference / "validation.csv", ValidationRow)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_train_from_the_transformer_file_and_merge_into_it(
    pipelines: dict[str, Path], image_folder: Path, tmp_path: Path, family: str
) -> None:
    """Train from the transformer's single file (original naming, as released) with the pipeline
    folder for the rest, merge the delta into that file: every tensor equals base + delta applied to
    the diffusers transformer, converted back to the original naming."""
    naming = FAMILIES[family][1]
    single = write_original_transformer_file(pipelines[family], naming, tmp_path / "transformer.safetensors")
    out = tmp_path / "run"
    args = train_args(single, image_folder, out, "--base-config", str(pipelines[family]), "--text-tokens", "32")
    result = sara_train_cli(*args, "--delta-dtype", "fp32", "--steps", "3")
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "merged.safetensors"
    delta_path = out / "sara_delta.safetensors"
    result = sara_train_cli("merge", "--base", str(single), "--delta", str(delta_path), "--out", str(merged))
    assert result.returncode == 0, result.stderr
    transformer = load_base(pipelines[family]).denoiser
    read_delta(delta_path).apply_to(transformer)  # original-naming delta onto the diffusers model
    expected = original_state(naming, transformer.state_dict())
    got = load_file(merged)
    assert got.keys() == expected.keys()
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(got[FAMILIES[family][3]], load_file(single)[FAMILIES[family][3]])


def test_an_fp8_transformer_file_loads_as_its_values(pipelines: dict[str, Path], tmp_path: Path) -> None:
    """A Flux transformer file stored in float8_e4m3fn (as fp8 releases are) under a checkpoint's
    ``model.diffusion_model.`` prefix loads, through the naming table, as exactly those fp8 values."""
    from safetensors.torch import save_file

    folder = pipelines["flux"]
    reference = load_base(folder).denoiser.state_dict()
    original = original_state(flux.NAMING, reference)
    fp8 = {"model.diffusion_model." + key: tensor.to(torch.float8_e4m3fn) for key, tensor in original.items()}
    save_file(fp8, tmp_path / "flux-fp8.safetensors")
    loaded = load_base(tmp_path / "flux-fp8.safetensors", config_dir=folder).denoiser.state_dict()
    assert loaded.keys() == reference.keys()
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[key].to(torch.float8_e4m3fn).float()), key


@pytest.mark.parametrize("source", ["folder", "fp8 file"])
def test_bf16_loads_the_denoiser_and_text_encoders_in_bf16_and_the_vae_in_fp32(
    pipelines: dict[str, Path], tmp_path: Path, source: str
) -> None:
    """``load_base(dtype=bf16)`` (what --mixed-precision bf16 loads): the transformer and text encoders
    hold the fp32 base's values rounded to bf16; the VAE keeps its fp32 values."""
    from safetensors.torch import save_file

    folder = pipelines["flux"]
    reference = load_base(folder)
    path = folder
    if source == "fp8 file":
        original = original_state(flux.NAMING, reference.denoiser.state_dict())
        save_file(
            {key: tensor.to(torch.float8_e4m3fn) for key, tensor in original.items()}, tmp_path / "f8.safetensors"
        )
        path = tmp_path / "f8.safetensors"
    loaded = load_base(path, config_dir=folder, dtype=torch.bfloat16)
    expected_denoiser = reference.denoiser.state_dict()
    for key, tensor in loaded.denoiser.state_dict().items():
        value = (
            expected_denoiser[key].to(torch.float8_e4m3fn).float() if source == "fp8 file" else expected_denoiser[key]
        )
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, value.bfloat16()), key
    for got, want in zip(loaded.text_encoders, reference.text_encoders):
        assert all(p.dtype == torch.bfloat16 for p in got.parameters())
        assert torch.equal(next(got.parameters()), next(want.parameters()).bfloat16())
    for (key, tensor), want in zip(loaded.vae.state_dict().items(), reference.vae.state_dict().values()):
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), key
    assert loaded.fingerprint != reference.fingerprint  # cached encodings of one dtype are not reused for another


def test_bf16_training_runs_from_a_bf16_load(pipelines: dict[str, Path], image_folder: Path, tmp_path: Path) -> None:
    result = sara_train_cli(
        *train_args(pipelines["sd3"], image_folder, tmp_path / "out", "--mixed-precision", "bf16", "--steps", "2")
    )
    assert result.returncode == 0, result.stderr
    delta = read_delta(tmp_path / "out" / "sara_delta.safetensors")
    assert json.loads(delta.metadata["config"])["mixed_precision"] == "bf16"
    values = torch.cat([layer.values.float() for layer in delta.layers.values()])
    assert torch.isfinite(values).all() and values.abs().sum() > 0
