"""diffusers <-> LDM UNet key names, checked against diffusers' own single-file converter."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from tiny_sd import TEXT_WIDTH, tiny_unet

from sara_train import SaRAConfig, SparseDelta, inject
from sara_train.engine.apply import fit_delta
from sara_train.engine.errors import DeltaMismatchError, SaRAError
from sara_train.engine.keys import resolve_keys
from sara_train.families.sd_unet import (
    delta_to_diffusers_keys,
    delta_to_ldm_keys,
    diffusers_to_ldm_unet_keys,
    full_resolution_modules,
    ldm_to_diffusers_unet_keys,
    unet_key_naming,
    unet_layout_from_diffusers_keys,
    unet_layout_from_ldm_keys,
)

LAYOUT_FIELDS = ("layers_per_block", "down_block_types", "up_block_types", "mid_block_type")


def deep_unet() -> UNet2DConditionModel:
    """Three levels, two layers each, attention in the first two: SD1.5's shape in miniature."""
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(32, 32, 64),
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl", "deep"])
def unet(request) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return deep_unet() if request.param == "deep" else tiny_unet(request.param)


def ldm_checkpoint(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    state = unet.state_dict()
    return {
        f"model.diffusion_model.{ldm}": state[key]
        for key, ldm in diffusers_to_ldm_unet_keys(state, unet.config).items()
    }


def test_diffusers_converter_reads_our_ldm_names_back_exactly(unet):
    state = unet.state_dict()
    converted = convert_ldm_unet_checkpoint(ldm_checkpoint(unet), dict(unet.config))
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_ldm_names_are_the_original_layout(unet):
    names = set(diffusers_to_ldm_unet_keys(unet.state_dict(), unet.config).values())
    assert {
        "input_blocks.0.0.weight",
        "time_embed.0.weight",
        "time_embed.2.bias",
        "out.0.weight",
        "out.2.weight",
        "middle_block.0.in_layers.0.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.out_layers.3.weight",
    } <= names
    assert ("label_emb.0.0.weight" in names) == (unet.config.addition_embed_type == "text_time")
    assert not any(name.startswith(("down_blocks", "up_blocks", "mid_block")) for name in names)


def test_inverse_mapping_undoes_the_forward_one_with_or_without_prefix(unet):
    forward = diffusers_to_ldm_unet_keys(unet.state_dict(), unet.config)
    for prefix in ("", "diffusion_model.", "model.diffusion_model."):
        inverse = ldm_to_diffusers_unet_keys([prefix + ldm for ldm in forward.values()], unet.config)
        assert all(inverse[prefix + ldm] == key for key, ldm in forward.items())


def test_layout_is_read_back_from_ldm_keys(unet):
    layout = unet_layout_from_ldm_keys(ldm_checkpoint(unet))
    for field in LAYOUT_FIELDS:
        expected = unet.config[field]
        assert layout[field] == (list(expected) if isinstance(expected, tuple) else expected), field


def test_keys_without_a_counterpart_are_named_in_the_error():
    config = tiny_unet("sd15").config
    for key in (
        "down_blocks.2.resnets.0.conv1.weight",
        "time_embedding.cond_proj.weight",
        "down_blocks.0.resnets.0.bogus.weight",
        "conv_in.weight.extra",
    ):
        with pytest.raises(SaRAError, match=key.replace(".", r"\.")):
            diffusers_to_ldm_unet_keys([key], config)
    with pytest.raises(SaRAError, match=r"input_blocks\.9\.0\.in_layers\.0\.weight"):
        ldm_to_diffusers_unet_keys(["input_blocks.9.0.in_layers.0.weight"], config)
    with pytest.raises(SaRAError, match="SimpleCrossAttnDownBlock2D"):
        diffusers_to_ldm_unet_keys(
            ["conv_in.weight"], {**config, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}
        )
    with pytest.raises(SaRAError, match="no LDM UNet keys"):
        unet_layout_from_ldm_keys(["first_stage_model.encoder.conv_in.weight"])


def test_key_naming_is_recognised():
    assert unet_key_naming(["input_blocks.1.1.proj_in.weight", "out.2.weight"]) == "ldm"
    assert unet_key_naming(["diffusion_model.middle_block.0.in_layers.0.weight"]) == "ldm"
    assert unet_key_naming(["down_blocks.0.resnets.0.conv1.weight", "conv_out.bias"]) == "diffusers"
    assert unet_key_naming(["conv_in.weight", "input_blocks.1.0.in_layers.0.weight"]) is None
    assert unet_key_naming(["encoder.layers.0.mlp.fc1.weight"]) is None


@pytest.fixture(scope="module")
def trained_delta():
    """A real SaRA delta of the tiny SDXL UNet (random updates) and that UNet."""
    torch.manual_seed(1)
    unet = tiny_unet("sdxl")
    handle = inject(unet, SaRAConfig(threshold=2e-3))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(torch.randn(values.shape, generator=generator) * 0.01)
    delta = handle.delta(metadata={"note": "test"})
    handle.remove(merge=False)
    return unet, delta


def test_delta_renamed_to_ldm_applies_like_the_original(trained_delta):
    unet, delta = trained_delta
    ldm = delta_to_ldm_keys(delta, unet.config)
    assert unet_key_naming(ldm.layers) == "ldm" and len(ldm.layers) == len(delta.layers)
    assert ldm.selection == delta.selection and ldm.metadata == delta.metadata
    expected = {k: v.clone() for k, v in unet.state_dict().items()}
    delta.apply_to(expected)
    checkpoint = {k: v.clone() for k, v in ldm_checkpoint(unet).items()}
    ldm.apply_to(checkpoint)  # bare LDM keys find the model.diffusion_model. prefix
    back = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert all(torch.equal(back[key], expected[key]) for key in expected)
    comfy_keys = [
        "diffusion_model." + ldm for ldm in diffusers_to_ldm_unet_keys(unet.state_dict(), unet.config).values()
    ]
    assert len(resolve_keys(ldm.layers, comfy_keys, "a ComfyUI model")) == len(ldm.layers)


def test_delta_renaming_round_trips(trained_delta):
    unet, delta = trained_delta
    back = delta_to_diffusers_keys(delta_to_ldm_keys(delta, unet.config, prefix="model.diffusion_model."), unet.config)
    assert list(back.layers) == list(delta.layers)
    assert all(back.layers[k] is delta.layers[k] for k in delta.layers)
    assert back.base_fingerprint == delta.base_fingerprint


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


def test_layout_is_read_back_from_diffusers_keys(unet):
    layout = unet_layout_from_diffusers_keys(unet.state_dict())
    assert {field: layout[field] for field in LAYOUT_FIELDS} == {
        field: (list(unet.config[field]) if isinstance(unet.config[field], (list, tuple)) else unet.config[field])
        for field in LAYOUT_FIELDS
    }


def test_a_delta_fits_either_naming(trained_delta):
    """One path (``fit_delta``) places a delta of either naming on a diffusers UNet, a ComfyUI model
    (``diffusion_model.*``) and a checkpoint (``model.diffusion_model.*``)."""
    unet, delta = trained_delta
    diffusers = shapes(unet.state_dict())
    checkpoint = shapes(ldm_checkpoint(unet))
    comfy = {key.replace("model.diffusion_model.", "diffusion_model.", 1): shape for key, shape in checkpoint.items()}
    ldm = delta_to_ldm_keys(delta, unet.config)
    for naming in (delta, ldm):
        assert set(fit_delta(naming, diffusers).layers) == set(delta.layers)
        assert set(fit_delta(naming, checkpoint).layers) == {"model.diffusion_model." + key for key in ldm.layers}
        assert set(fit_delta(naming, comfy).layers) == {"diffusion_model." + key for key in ldm.layers}
    on_unet = fit_delta(ldm, diffusers)
    assert all(
        on_unet.layers[key] is ldm.layers[ldm_key]
        for key, ldm_key in diffusers_to_ldm_unet_keys(delta.layers, unet.config).items()
    )
    other = tiny_unet("sd15") if unet.config.layers_per_block == 2 else deep_unet()  # another architecture
    with pytest.raises(DeltaMismatchError, match="another model"):
        fit_delta(delta, shapes(ldm_checkpoint(other)))


def test_an_ldm_delta_applies_to_a_diffusers_unet(trained_delta):
    """The delta renamed to original names, applied to a diffusers ``UNet2DConditionModel``, gives
    exactly what the diffusers-named delta gives."""
    unet, delta = trained_delta
    expected = {k: v.clone() for k, v in unet.state_dict().items()}
    delta.apply_to(expected)
    ldm = delta_to_ldm_keys(delta, unet.config, prefix="model.diffusion_model.")
    restore_point = ldm.apply_to(unet)
    try:
        assert all(torch.equal(unet.state_dict()[key], expected[key]) for key in expected)
    finally:
        restore_point.restore()


def test_a_diffusers_delta_never_lands_in_a_checkpoints_vae(trained_delta):
    """conv_in/conv_out exist under first_stage_model.encoder. too: naming decides, not suffixes."""
    unet, delta = trained_delta
    small = SparseDelta({key: delta.layers[key] for key in ("conv_in.weight", "conv_out.weight")})
    checkpoint = shapes(ldm_checkpoint(unet))
    checkpoint |= {
        "first_stage_model.encoder.conv_in.weight": checkpoint["model.diffusion_model.input_blocks.0.0.weight"],
        "first_stage_model.encoder.conv_out.weight": checkpoint["model.diffusion_model.out.2.weight"],
    }
    matched = fit_delta(small, checkpoint)
    assert set(matched.layers) == {
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.out.2.weight",
    }


@pytest.mark.parametrize("make_unet", [deep_unet, tiny_unet], ids=["three levels", "two levels"])
def test_full_resolution_modules_are_the_layers_producing_full_resolution_maps(make_unet) -> None:
    """The preset's regexes pick out exactly the convolutions whose output has the latent's height and
    width (found by running the UNet), plus the linear layers of those blocks; nothing else."""
    unet = make_unet()
    latent = 16
    full_resolution: set[str] = set()

    def record(name: str, output: torch.Tensor) -> None:
        if output.shape[-1] == latent:
            full_resolution.add(name)

    hooks = [
        module.register_forward_hook(lambda module, args, output, name=name: record(name, output))
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    unet(torch.randn(1, 4, latent, latent), 10, torch.randn(1, 77, unet.config.cross_attention_dim))
    for hook in hooks:
        hook.remove()
    patterns = full_resolution_modules(unet.config)
    excluded = {name for name, _ in unet.named_modules() if any(re.search(p, name) for p in patterns)}
    convolutions = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert excluded & convolutions == full_resolution
    linears = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = {conv.rsplit(".", 1)[0] for conv in full_resolution}  # e.g. down_blocks.0.resnets.0
    assert excluded & linears == {name for name in linears if any(name.startswith(f"{b}.") for b in blocks)}
    handle = inject(unet, SaRAConfig(budget=0.05, exclude=patterns))
    assert handle.num_trainable > 0 and not any(name.rsplit(".", 1)[0] in excluded for name in handle.layers)
