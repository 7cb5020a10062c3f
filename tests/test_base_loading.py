"""load_base: tiny diffusers folders of each kind and an SD1.5 single-file checkpoint, for real."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDPMScheduler
from single_file import write_single_file_checkpoint
from tiny_sd import TEXT_WIDTH, write_tiny_sd_pipeline

from sara_train.engine.errors import SaRAError
from sara_train.trainer.base_model import BaseModel, load_base

PROMPTS = ["a red fox", "two blue cats, sitting", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bases")
    found = {kind: write_tiny_sd_pipeline(root / kind, kind) for kind in ("sd15", "sd2", "sdxl")}
    found["sd15_file"] = write_single_file_checkpoint(found["sd15"], root / "sd15.safetensors")
    return found


@pytest.fixture(scope="module")
def bases(folders) -> dict[str, BaseModel]:
    return {kind: load_base(folders[kind]) for kind in ("sd15", "sd2", "sdxl")}


def tokens(tokenizer, prompts):
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def test_kind_scheduler_and_components(bases, folders):
    for name, kind, prediction in (
        ("sd15", "sd1", "epsilon"),
        ("sd2", "sd2", "v_prediction"),
        ("sdxl", "sdxl", "epsilon"),
    ):
        base = bases[name]
        assert base.kind == kind and base.source == folders[name]
        assert isinstance(base.noise_scheduler, DDPMScheduler)
        assert base.noise_scheduler.config.prediction_type == prediction
        assert len(base.text_encoders) == len(base.tokenizers) == (2 if kind == "sdxl" else 1)
        assert base.unet is base.denoiser is base.pipeline().unet and base.unet.config["in_channels"] == 4


def test_sd1_and_sd2_prompts_are_the_text_encoders_last_states(bases):
    for name in ("sd15", "sd2"):
        base = bases[name]
        embeddings = base.encode_prompts(PROMPTS)
        assert len(embeddings) == len(PROMPTS)
        with torch.no_grad():
            expected = base.text_encoders[0](tokens(base.tokenizers[0], PROMPTS))[0]
        for embedding, states in zip(embeddings, expected):
            assert embedding.pooled is None
            assert embedding.hidden_states.shape == (16, TEXT_WIDTH)
            torch.testing.assert_close(embedding.hidden_states, states)
        assert not torch.allclose(embeddings[0].hidden_states, embeddings[1].hidden_states)


def test_sdxl_prompts_are_both_penultimate_states_and_the_pooled_projection(bases):
    base = bases["sdxl"]
    embeddings = base.encode_prompts(PROMPTS)
    with torch.no_grad():
        first = base.text_encoders[0](tokens(base.tokenizers[0], PROMPTS), output_hidden_states=True)
        second = base.text_encoders[1](tokens(base.tokenizers[1], PROMPTS), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    for i, embedding in enumerate(embeddings):
        assert embedding.hidden_states.shape == (16, 2 * TEXT_WIDTH)
        assert embedding.pooled.shape == (TEXT_WIDTH,)
        torch.testing.assert_close(embedding.hidden_states, states[i])
        torch.testing.assert_close(embedding.pooled, second.text_embeds[i])


def test_images_encode_to_scaled_deterministic_latents(bases):
    base = bases["sd15"]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = base.encode_images(pixels)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    assert torch.equal(latents, base.encode_images(pixels))
    with torch.no_grad():
        mean = base.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents, mean * base.vae.config.scaling_factor)
    with pytest.raises(SaRAError, match=r"\[-1, 1\]"):
        base.encode_images(pixels * 127.5 + 127.5)
    with pytest.raises(SaRAError, match="divisible by 2"):
        base.encode_images(torch.zeros(1, 3, 31, 32))


def test_pipeline_renders_an_image(bases):
    image = (
        bases["sd15"]
        .pipeline()("a fox", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
        .images[0]
    )
    assert image.size == (32, 32)


def test_fingerprint_identifies_the_encoders(bases, folders):
    again = load_base(folders["sd15"])
    assert again.fingerprint == bases["sd15"].fingerprint and len(again.fingerprint) == 16
    assert len({bases[kind].fingerprint for kind in ("sd15", "sd2", "sdxl")}) == 3
    half = load_base(folders["sd15"], dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.fingerprint != again.fingerprint


def test_single_file_loads_the_same_model_as_its_folder(bases, folders):
    from_file = load_base(folders["sd15_file"], config_dir=folders["sd15"])
    from_folder = bases["sd15"]
    assert from_file.kind == "sd1" and from_file.source == folders["sd15_file"]
    for name in ("unet", "vae"):
        ours, theirs = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    assert from_file.fingerprint == from_folder.fingerprint
    torch.testing.assert_close(
        from_file.encode_prompts(PROMPTS[:1])[0].hidden_states,
        from_folder.encode_prompts(PROMPTS[:1])[0].hidden_states,
    )


def test_single_file_without_config_explains_base_config(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SaRAError, match="--base-config") as error:
        load_base(folders["sd15_file"])
    assert str(folders["sd15_file"]) in str(error.value)
    with pytest.raises(SaRAError, match="no such folder"):
        load_base(folders["sd15_file"], config_dir=tmp_path / "missing")
    with pytest.raises(SaRAError, match="label_emb.*architecture"):
        load_base(folders["sd15_file"], config_dir=folders["sdxl"])


def test_bad_paths_are_refused_with_the_cause(folders, tmp_path):
    with pytest.raises(SaRAError, match="no such file or folder"):
        load_base(tmp_path / "missing")
    with pytest.raises(SaRAError, match="no model_index.json"):
        load_base(folders["sd15"] / "unet")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95not really a pickle")
    with pytest.raises(SaRAError, match="never unpickles"):
        load_base(pickle)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(folders["sd15_file"].read_bytes()[:4096])
    with pytest.raises(SaRAError, match="truncated"):
        load_base(truncated, config_dir=folders["sd15"])


def test_broken_folders_are_refused_with_the_cause(folders, tmp_path):
    corrupt = shutil.copytree(folders["sd15"], tmp_path / "corrupt")
    weights = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SaRAError, match="corrupt.*diffusion_pytorch_model"):
        load_base(corrupt)
    pickled = shutil.copytree(folders["sd15"], tmp_path / "pickled")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(SaRAError, match="safetensors"):
        load_base(pickled)
    other = shutil.copytree(folders["sd15"], tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(SaRAError, match="FluxPipeline"):
        load_base(other)
