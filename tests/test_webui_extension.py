"""The A1111 / Forge extension (``scripts/sara_webui.py``, ``sara_webui.hooks``) against stand-ins of
the webui objects it touches (``webui_standins.py``); opt-in checks against local webui checkouts
(``A1111_DIR``, ``FORGE_DIR``) that the names it relies on exist there."""

from __future__ import annotations

import ast
import logging
import os
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_sd import tiny_unet
from webui_standins import (
    StandInModel,
    make_extra_networks_module,
    make_network_module,
    make_networks_module,
)

import sara_train
from sara_train.engine.delta import LayerDelta
from sara_train.export.diff import export_webui_diff
from sara_train.families.sd_unet import diffusers_to_ldm_unet_keys
from sara_webui.hooks import install
from tools.comfyui_server import REPO, make_delta


@pytest.fixture(scope="module")
def ldm_unet() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_unet("sd15")
    state = model.state_dict()
    return {ldm: state[key].clone() for key, ldm in diffusers_to_ldm_unet_keys(state, dict(model.config)).items()}


@pytest.fixture
def webui(tmp_path, ldm_unet):
    """Folders models/Lora (one LoRA) and models/sara (a delta for the model, one for another)."""
    lora_dir, sara_dir = tmp_path / "Lora", tmp_path / "sara"
    lora_dir.mkdir()
    sara_dir.mkdir()
    save_file({"lora_unet_out_2.lora_up.weight": torch.zeros(4, 1)}, str(lora_dir / "plain_lora.safetensors"))
    delta = make_delta(ldm_unet, 1, 0.05)
    delta.save(sara_dir / "style.safetensors")
    make_delta({"other.weight": torch.randn(8, 8)}, 2, 0.5).save(sara_dir / "other.safetensors")
    return lora_dir, sara_dir, delta


def test_a1111_applies_the_sparse_update_at_the_tag_weight_and_restores_the_base(webui, ldm_unet) -> None:
    lora_dir, sara_dir, delta = webui
    network = make_network_module()
    networks = make_networks_module(network, lora_dir)
    networks.extra_network_lora = object()
    extra_networks = make_extra_networks_module()
    shared = types.SimpleNamespace(sd_model=StandInModel(ldm_unet))
    assert install(networks, network, [str(sara_dir)], shared, extra_networks) == "a1111"
    assert extra_networks.aliases == {"sara": networks.extra_network_lora}
    assert {"plain_lora", "style", "other"} <= set(networks.available_networks)
    networks.load_networks(["style"], [0.7])
    networks.apply_weights(shared.sd_model)
    expected = {key: value.clone() for key, value in ldm_unet.items()}
    delta.apply_to(expected, strength=0.7)
    applied = shared.sd_model.unet_state()
    assert all(torch.equal(applied[key], expected[key]) for key in expected)
    assert any(not torch.equal(applied[key], ldm_unet[key]) for key in delta.layers)
    networks.load_networks([], [])
    networks.apply_weights(shared.sd_model)
    restored = shared.sd_model.unet_state()
    assert all(torch.equal(restored[key], ldm_unet[key]) for key in ldm_unet)
    with pytest.raises(sara_train.SaRAError, match=r"other\.safetensors: .* not in the base model.*another model"):
        networks.load_networks(["other"], [1.0])


def test_a_lora_keeps_its_name_and_files_in_models_lora_load_too(webui, ldm_unet, caplog) -> None:
    lora_dir, sara_dir, delta = webui
    delta.save(sara_dir / "plain_lora.safetensors")
    delta.save(lora_dir / "dropped_in_lora_folder.safetensors")
    network = make_network_module()
    networks = make_networks_module(network, lora_dir)
    shared = types.SimpleNamespace(sd_model=StandInModel(ldm_unet))
    with caplog.at_level(logging.WARNING, logger="sara_webui"):
        install(networks, network, [str(sara_dir)], shared)
    assert Path(networks.available_networks["plain_lora"].filename).parent == lora_dir
    assert "also a LoRA's name" in caplog.text
    networks.load_networks(["dropped_in_lora_folder"], [1.0])
    networks.apply_weights(shared.sd_model)
    expected = {key: value.clone() for key, value in ldm_unet.items()}
    delta.apply_to(expected)
    assert all(torch.equal(shared.sd_model.unet_state()[key], expected[key]) for key in expected)


def test_forge_reads_a_sara_file_as_the_exact_full_difference(webui, tmp_path) -> None:
    lora_dir, sara_dir, delta = webui
    network = make_network_module()
    networks = make_networks_module(network, lora_dir, forge=True)
    extra_networks = make_extra_networks_module()
    callbacks = []
    assert install(networks, network, [str(sara_dir)], None, extra_networks, callbacks.append) == "forge"
    assert extra_networks.aliases == {}  # the Lora extension registers its extra network later, before the UI
    networks.extra_network_lora = object()  # the Lora extension's before_ui, then the webui clears aliases
    extra_networks.initialize()
    for callback in callbacks:
        callback()
    assert extra_networks.aliases == {"sara": networks.extra_network_lora}
    networks.load_networks(["style", "plain_lora"], [1.0, 1.0])
    sara_state, plain = networks.loaded_state_dicts
    assert len(sara_state) == len(delta.layers)
    for key, layer in delta.layers.items():
        expected = torch.zeros(layer.shape).view(-1)
        expected[layer.flat_indices.long()] = layer.values
        diff = sara_state["lora_unet_" + key.removesuffix(".weight").replace(".", "_") + ".diff"]
        assert torch.equal(diff.view(-1), expected)
    file_state = load_file(str(export_webui_diff(delta, tmp_path / "full.safetensors").path))
    assert sara_state.keys() == file_state.keys()  # the same tensors as the exported file
    assert "read by the original" in plain


def test_the_entry_script_installs_with_the_webui_modules(webui, tmp_path, monkeypatch) -> None:
    """At start-up the extensions' scripts load, then the webui clears the aliases, then the before-UI
    callbacks run (the Lora extension's first, making its extra network): the alias must survive."""
    lora_dir, sara_dir, _ = webui
    network = make_network_module()
    networks = make_networks_module(network, lora_dir)
    before_ui = []
    modules = types.ModuleType("modules")
    modules.extra_networks = make_extra_networks_module()
    modules.paths = types.SimpleNamespace(models_path=str(tmp_path))
    modules.script_callbacks = types.SimpleNamespace(on_before_ui=before_ui.append)
    modules.shared = types.SimpleNamespace(sd_model=None)
    for name, module in {
        "modules": modules,
        "modules.extra_networks": modules.extra_networks,
        "network": network,
        "networks": networks,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("paths", "script_callbacks", "shared"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    runpy.run_path(str(REPO / "scripts" / "sara_webui.py"))
    assert (tmp_path / "sara").is_dir() and not modules.extra_networks.aliases
    modules.extra_networks.initialize()
    networks.extra_network_lora = object()
    for callback in before_ui:
        callback()
    assert modules.extra_networks.aliases == {"sara": networks.extra_network_lora}
    (tmp_path / "sara" / "style.safetensors").write_bytes((sara_dir / "style.safetensors").read_bytes())
    networks.list_available_networks()
    assert Path(networks.available_networks["style"].filename).parent == tmp_path / "sara"
    wrapped = networks.list_available_networks, networks.load_network
    runpy.run_path(str(REPO / "scripts" / "sara_webui.py"))  # "Reload UI": the same modules, hooked once
    assert (networks.list_available_networks, networks.load_network) == wrapped


def test_a1111_bias_updates_and_a_layer_of_another_shape(tmp_path, ldm_unet) -> None:
    """A bias update comes back as the webui's extra bias (scaled by the tag weight); a weight of
    another shape (a model switched under a loaded network) is a RuntimeError, which A1111 counts as
    that layer's error instead of stopping the image."""
    generator = torch.Generator().manual_seed(3)
    weight = LayerDelta(
        tuple(ldm_unet["out.2.weight"].shape),
        torch.tensor([0, 7], dtype=torch.int32),
        torch.randn(2, generator=generator),
    )
    bias = LayerDelta(
        tuple(ldm_unet["out.2.bias"].shape), torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0.5, -0.25])
    )
    sara_dir = tmp_path / "sara"
    sara_train.SparseDelta({"out.2.weight": weight, "out.2.bias": bias}).save(sara_dir / "with_bias.safetensors")
    network = make_network_module()
    networks = make_networks_module(network, tmp_path)
    shared = types.SimpleNamespace(sd_model=StandInModel(ldm_unet))
    install(networks, network, [str(sara_dir)], shared)
    networks.load_networks(["with_bias"], [0.5])
    networks.apply_weights(shared.sd_model)
    applied = shared.sd_model.unet_state()
    expected = {key: value.clone() for key, value in ldm_unet.items()}
    sara_train.SparseDelta({"out.2.weight": weight, "out.2.bias": bias}).apply_to(expected, strength=0.5)
    assert torch.equal(applied["out.2.bias"], expected["out.2.bias"])
    assert torch.equal(applied["out.2.weight"], expected["out.2.weight"])
    (module,) = networks.loaded_networks[0].modules.values()
    with pytest.raises(RuntimeError, match="delta is for another model"):
        module.calc_updown(torch.zeros(3, 3))


def test_the_repository_is_a_valid_webui_extension() -> None:
    """A1111 imports every top-level .py of scripts/ at start-up and runs a root install.py on every
    start (ComfyUI-Manager would too): scripts/ holds only the entry, no package, no install.py."""
    assert sorted(path.name for path in (REPO / "scripts").iterdir() if path.name != "__pycache__") == [
        "sara_webui.py"
    ]
    assert not (REPO / "install.py").exists()


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a Python file, and methods as ``Class.name``."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


@pytest.mark.skipif(not os.environ.get("A1111_DIR"), reason="opt-in: set A1111_DIR to a local A1111 checkout")
def test_a1111_checkout_has_what_the_extension_uses() -> None:
    root = Path(os.environ["A1111_DIR"]) / "extensions-builtin" / "Lora"
    networks, network = defined_names(root / "networks.py"), defined_names(root / "network.py")
    assert {"load_network", "list_available_networks", "available_networks", "available_network_aliases"} <= networks
    assert "assign_network_names_to_compvis_modules" in networks
    assert {"NetworkOnDisk", "Network", "NetworkWeights", "NetworkModule.finalize_updown"} <= network
    extra = defined_names(Path(os.environ["A1111_DIR"]) / "modules" / "extra_networks.py")
    assert "register_extra_network_alias" in extra


@pytest.mark.skipif(not os.environ.get("FORGE_DIR"), reason="opt-in: set FORGE_DIR to a local Forge/reForge checkout")
def test_forge_checkout_has_what_the_extension_uses() -> None:
    root = Path(os.environ["FORGE_DIR"]) / "extensions-builtin"
    (lora,) = [path for path in (root / "sd_forge_lora", root / "Lora") if (path / "networks.py").is_file()]
    networks = defined_names(lora / "networks.py")
    assert {"load_lora_state_dict", "list_available_networks", "available_networks"} <= networks
    assert "NetworkOnDisk" in defined_names(lora / "network.py")
