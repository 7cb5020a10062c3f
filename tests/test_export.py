"""Exports for LoRA-folder loaders (``sara_train.export``, ``sara-train export``): the exact LyCORIS
"full" file and the SVD LoRA, checked against the delta itself, and the loaders' key rules as the
webuis document them (A1111's compvis module names, ComfyUI/Forge's ``lora_unet_`` map, SD.Next's
diffusers module paths) applied to real diffusers and Flux models built small."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sd import tiny_unet

import sara_train
from sara_train.engine.delta import LayerDelta
from sara_train.export import export_lora, export_webui_diff, lora_factors
from sara_train.export.layers import delta_in_naming, model_shapes
from sara_train.families import flux
from sara_train.families.identify import delta_family
from sara_train.families.sd_unet import delta_to_ldm_keys
from tools.comfyui_server import REPO, make_delta


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_unet("sd15")


@pytest.fixture(scope="module")
def diffusers_delta(unet) -> sara_train.SparseDelta:
    """A delta over the tiny UNet's weights in diffusers names."""
    return make_delta(unet.state_dict(), 1, 0.05)


@pytest.fixture(scope="module")
def ldm_delta(unet, diffusers_delta) -> sara_train.SparseDelta:
    """The same delta in the LDM names ``sara-train train`` saves (bare)."""
    return delta_to_ldm_keys(diffusers_delta, dict(unet.config))


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def a1111_module_names(ldm_keys) -> dict[str, str]:
    """A1111's ``network_layer_mapping`` for an LDM UNet, from its documented rule: each module of
    the wrapped model (``diffusion_model.<path>``) under its path with dots replaced by underscores."""
    modules = {"diffusion_model." + key.rpartition(".")[0] for key in ldm_keys}
    return {name.replace(".", "_"): name for name in modules}


def a1111_lookup(file_key: str) -> str:
    """The layer name A1111 looks up for a file key: the part before the first dot, with
    ``lora_unet`` replaced by ``diffusion_model``."""
    return file_key.split(".", 1)[0].replace("lora_unet", "diffusion_model", 1)


def test_diff_file_holds_the_dense_update_under_the_names_a1111_and_comfyui_look_up(tmp_path, unet, ldm_delta) -> None:
    report = export_webui_diff(ldm_delta, tmp_path / "full.safetensors")
    tensors, metadata = read(tmp_path / "full.safetensors")
    assert report.layers == len(tensors) == len(ldm_delta.layers) and report.entries == ldm_delta.num_entries
    ldm_shapes = model_shapes("ldm", {k: v.shape for k, v in unet.state_dict().items()})
    modules = a1111_module_names(ldm_shapes)
    assert len(modules) == len({key.rpartition(".")[0] for key in ldm_shapes})  # the rule is unambiguous here
    for key, layer in ldm_delta.layers.items():
        file_key = "lora_unet_" + key.removesuffix(".weight").replace(".", "_") + ".diff"  # ComfyUI / Forge rule
        diff = tensors[file_key]
        assert modules[a1111_lookup(file_key)] == "diffusion_model." + key.removesuffix(".weight")
        assert diff.shape == layer.shape == ldm_shapes[key] and diff.dtype == layer.values.dtype
        expected = torch.zeros(layer.shape).view(-1)
        expected[layer.flat_indices.long()] = layer.values
        assert torch.equal(diff.view(-1), expected)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "full"}
    assert metadata["ss_output_name"] == "full" and metadata["sara_delta"] == ldm_delta.content_hash()


def test_any_delta_naming_gives_the_same_file_given_the_base(tmp_path, unet, diffusers_delta, ldm_delta) -> None:
    base = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    export_webui_diff(diffusers_delta, tmp_path / "from_diffusers.safetensors", base=base)
    prefixed = delta_to_ldm_keys(diffusers_delta, dict(unet.config), prefix="diffusion_model.")
    export_webui_diff(prefixed, tmp_path / "from_comfyui.safetensors")
    reference, _ = read(export_webui_diff(ldm_delta, tmp_path / "ldm.safetensors").path)
    for name in ("from_diffusers", "from_comfyui"):
        tensors, _ = read(tmp_path / f"{name}.safetensors")
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[key], reference[key]) for key in reference)
    with pytest.raises(sara_train.SaRAError, match="need the base model"):
        export_webui_diff(diffusers_delta, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_sdnext_naming_is_the_diffusers_module_path(tmp_path, unet, ldm_delta) -> None:
    checkpoint = {
        "model.diffusion_model." + k: v
        for k, v in model_shapes("ldm", {k: v.shape for k, v in unet.state_dict().items()}).items()
    }
    checkpoint["first_stage_model.decoder.conv_in.weight"] = (8, 4, 3, 3)  # a checkpoint's VAE is ignored
    export_webui_diff(ldm_delta, tmp_path / "sdnext.safetensors", naming="diffusers", base=checkpoint)
    tensors, _ = read(tmp_path / "sdnext.safetensors")
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules() if name}
    assert len(tensors) == len(ldm_delta.layers)
    for key, diff in tensors.items():
        assert key.endswith(".diff") and modules[key.removesuffix(".diff")].weight.shape == diff.shape
    with pytest.raises(sara_train.SaRAError, match="need the base model"):
        export_webui_diff(ldm_delta, tmp_path / "y.safetensors", naming="diffusers")


def test_value_dtypes_round_once_and_biases_are_diff_b(tmp_path, ldm_delta) -> None:
    export_webui_diff(ldm_delta, tmp_path / "half.safetensors", dtype=torch.float16)
    tensors, _ = read(tmp_path / "half.safetensors")
    for key, layer in ldm_delta.layers.items():
        diff = tensors["lora_unet_" + key.removesuffix(".weight").replace(".", "_") + ".diff"]
        assert diff.dtype == torch.float16
        assert torch.equal(diff.view(-1)[layer.flat_indices.long()], layer.values.half())
    bias = LayerDelta((4,), torch.tensor([1, 3], dtype=torch.int32), torch.tensor([0.5, -0.25]))
    with_bias = sara_train.SparseDelta({"diffusion_model.out.2.bias": bias})
    tensors, metadata = read(export_webui_diff(with_bias, tmp_path / "bias.safetensors").path)
    assert torch.equal(tensors["lora_unet_out_2.diff_b"], torch.tensor([0.0, 0.5, 0.0, -0.25]))
    assert "ss_base_model_version" not in metadata  # one bias tells no family: nothing is claimed
    scale = sara_train.SparseDelta({"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale": bias})
    with pytest.raises(sara_train.SaRAError, match="neither a module's weight nor its bias"):
        export_webui_diff(scale, tmp_path / "scale.safetensors")


@pytest.mark.parametrize(
    "metadata, version",
    [
        ({"base_kind": "sdxl"}, "sdxl_base_v1-0"),
        ({"base_model_type": "SD20"}, "sd_v2"),
        ({"base_model_type": "Flux"}, "flux1"),
        ({"base_model_type": "SD3"}, "sd3"),
        ({"base_model_type": "WAN21_T2V"}, None),
    ],
)
def test_the_recorded_family_names_the_base_model_version(tmp_path, ldm_delta, metadata, version) -> None:
    delta = sara_train.SparseDelta(ldm_delta.layers, metadata=metadata)
    _, written = read(export_webui_diff(delta, tmp_path / "v.safetensors").path)
    assert written.get("ss_base_model_version") == version
    assert written.get("ss_v2") == (None if version is None else str(version == "sd_v2"))


@pytest.mark.parametrize("kind, family", [("sd15", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl")])
def test_the_family_is_read_off_the_keys_when_nothing_is_recorded(kind, family) -> None:
    torch.manual_seed(0)
    model = tiny_unet(kind)
    delta = make_delta(model.state_dict(), 1, 0.05)
    assert delta_family(delta) == family
    assert delta_family(delta_to_ldm_keys(delta, dict(model.config))) == family


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def test_a_diffusers_flux_delta_exports_under_the_fused_original_names(tmp_path) -> None:
    model = tiny_flux()
    diffusers_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    delta = make_delta(model.state_dict(), 1, 0.1)
    original = flux.NAMING.original_shapes(diffusers_shapes)
    export_webui_diff(delta, tmp_path / "flux.safetensors", base=diffusers_shapes)
    tensors, metadata = read(tmp_path / "flux.safetensors")
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    qkv = tensors["lora_unet_double_blocks_0_img_attn_qkv.diff"]
    assert qkv.shape == original["double_blocks.0.img_attn.qkv.weight"]
    parts = []
    for name in ("to_q", "to_k", "to_v"):
        layer = delta.layers[f"transformer_blocks.0.attn.{name}.weight"]
        dense = torch.zeros(layer.shape).view(-1)
        dense[layer.flat_indices.long()] = layer.values
        parts.append(dense.view(layer.shape))
    assert torch.equal(qkv, torch.cat(parts))
    in_original = delta_in_naming(delta, "ldm", diffusers_shapes)
    comfy_named = sara_train.SparseDelta({"diffusion_model." + k: v for k, v in in_original.layers.items()})
    again, _ = read(export_webui_diff(comfy_named, tmp_path / "again.safetensors").path)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def sparse_low_rank_delta() -> sara_train.SparseDelta:
    """Rank 2 in a 32x48 Linear weight and rank 1 in a 16x8x3x3 conv kernel, both sparse (a few
    rows times a few columns)."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.zeros(32, 48)
    rows, columns = torch.tensor([1, 5, 9, 20]), torch.tensor([0, 7, 8, 30, 47])
    linear[rows[:, None], columns] = torch.randn(4, 2, generator=generator) @ torch.randn(2, 5, generator=generator)
    conv = torch.zeros(16, 72)
    conv[torch.tensor([2, 3])[:, None], torch.tensor([4, 40, 71])] = torch.outer(torch.randn(2), torch.randn(3))
    layers = {}
    for key, dense, shape in (
        ("diffusion_model.input_blocks.1.1.proj_in.weight", linear, (32, 48)),
        ("diffusion_model.input_blocks.0.0.weight", conv, (16, 8, 3, 3)),
    ):
        flat = dense.reshape(-1)
        indices = flat.nonzero().squeeze(1)
        layers[key] = LayerDelta(shape, indices.to(torch.int32), flat[indices])
    return sara_train.SparseDelta(layers)


def test_a_low_rank_delta_exports_as_a_lora_with_no_error(tmp_path) -> None:
    delta = sparse_low_rank_delta()
    export = export_lora(delta, tmp_path / "lora.safetensors", rank=2, max_error=1e-5)
    assert export.relative_error < 1e-6 and all(layer.relative_error < 1e-6 for layer in export.layers)
    tensors, metadata = read(tmp_path / "lora.safetensors")
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "2"
    for key, layer in delta.layers.items():
        name = "lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
        product = (up.flatten(1) @ down.flatten(1) * scale).reshape(layer.shape)  # what the loaders compute
        dense = torch.zeros(layer.shape).view(-1)
        dense[layer.flat_indices.long()] = layer.values
        torch.testing.assert_close(product, dense.view(layer.shape), atol=1e-5, rtol=1e-5)
    assert tensors["lora_unet_input_blocks_0_0.lora_down.weight"].shape == (2, 8, 3, 3)
    assert tensors["lora_unet_input_blocks_0_0.lora_up.weight"].shape == (16, 2, 1, 1)


def test_a_full_rank_delta_reports_the_svd_error_and_refuses_above_the_limit(tmp_path, ldm_delta) -> None:
    export = lora_factors(ldm_delta, rank=4)
    discarded = total = 0.0
    for layer in ldm_delta.layers.values():
        dense = torch.zeros(layer.shape).view(-1)
        dense[layer.flat_indices.long()] = layer.values.float()
        singular = torch.linalg.svdvals(dense.view(layer.shape[0], -1).double())
        discarded += float((singular[4:] ** 2).sum())
        total += float((singular**2).sum())
    assert export.relative_error == pytest.approx(math.sqrt(discarded / total), rel=1e-4)
    assert 0.3 < export.relative_error < 1
    with pytest.raises(sara_train.SaRAError, match=r"relative error, above the maximum 10\.0%; nothing written"):
        export_lora(ldm_delta, tmp_path / "refused.safetensors", rank=4)
    assert list(tmp_path.iterdir()) == []
    written = export_lora(ldm_delta, tmp_path / "accepted.safetensors", rank=4, max_error=1.0)
    assert written.relative_error == export.relative_error and (tmp_path / "accepted.safetensors").is_file()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sara_train", "export", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_cli_prints_sizes_and_errors_and_refuses_bad_requests(tmp_path, unet, ldm_delta) -> None:
    ldm_delta.save(tmp_path / "delta.safetensors")
    out = cli(str(tmp_path / "delta.safetensors"), "--to", "webui-diff", "-o", str(tmp_path / "full.safetensors"))
    assert out.returncode == 0, out.stderr
    assert "x the sparse file" in out.stdout and "base model version sd_v1" in out.stdout
    again = cli(str(tmp_path / "delta.safetensors"), "--to", "webui-diff", "-o", str(tmp_path / "full.safetensors"))
    assert again.returncode == 2 and "already exists" in again.stderr
    refused = cli(str(tmp_path / "delta.safetensors"), "--to", "lora", "--rank", "2", "-o", str(tmp_path / "l.st"))
    assert refused.returncode == 2 and "nothing written" in refused.stderr and not (tmp_path / "l.st").exists()
    unet_file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    sdnext = tmp_path / "sdnext.safetensors"
    args = ("--to", "webui-diff", "--naming", "diffusers", "--dtype", "fp16", "-o", str(sdnext))
    out = cli(str(tmp_path / "delta.safetensors"), *args, "--base", str(unet_file))
    assert out.returncode == 0, out.stderr
    written = load_file(str(sdnext))
    assert any(key.startswith("lora_unet_down_blocks_") for key in written)
    assert not any(part in key for key in written for part in ("input_blocks", "middle_block", "output_blocks"))
    assert {tensor.dtype for tensor in written.values()} == {torch.float16}
    lora_file = tmp_path / "lora.safetensors"
    lora = cli(
        str(tmp_path / "delta.safetensors"), "--to", "lora", "--rank", "8", "--max-error", "1", "-o", str(lora_file)
    )
    assert lora.returncode == 0, lora.stderr
    assert "relative Frobenius error:" in lora.stdout and "rank 8" in lora.stdout and lora_file.is_file()


def test_a_delta_saved_by_the_comfyui_node_is_in_comfyui_names_for_any_family(tmp_path) -> None:
    layer = LayerDelta((4, 2), torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0.5, -1.0]))
    wan = {"blocks.0.self_attn.q.weight": layer}
    with pytest.raises(sara_train.SaRAError, match="cannot tell which model's names"):
        export_webui_diff(sara_train.SparseDelta(wan), tmp_path / "unknown.safetensors")
    from_node = sara_train.SparseDelta(wan, metadata={"base_model_type": "WAN21_T2V"})
    tensors, _ = read(export_webui_diff(from_node, tmp_path / "wan.safetensors").path)
    assert list(tensors) == ["lora_unet_blocks_0_self_attn_q.diff"]
