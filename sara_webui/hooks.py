"""Hooks into a webui's built-in Lora extension (its ``networks`` and ``network`` modules) that make
native SaRA delta files load like LoRAs, so ``<sara:name:weight>`` (and ``<lora:name:weight>``)
works with the webui's own weight backup and restore.

* Listing: after the extension lists ``models/Lora``, the ``.safetensors`` files of the SaRA
  folders are added to ``networks.available_networks`` (a name a LoRA already has is left to it).
  They appear as cards in the Lora tab.
* Loading, A1111 / SD.Next style (``networks.load_network`` builds a ``network.Network`` of
  ``NetworkModule`` s): a SaRA file becomes one ``SparseUpdateModule`` per layer, found by the
  layer names the extension uses for the loaded model (``network_layer_mapping``:
  ``diffusion_model_<module path with underscores>``). Its ``calc_updown`` scatters the sparse
  values into a dense update only while the webui applies it; the webui scales it by the tag's
  weight, backs up the weight and restores it.
* Loading, Forge / reForge style (``networks.load_lora_state_dict`` feeds a ComfyUI-derived loader):
  a SaRA file is read as the LyCORIS "full" difference that loader reads natively.
* The ``sara`` tag is an alias of the Lora extension's own extra network, so ``<sara:…>`` and
  ``<lora:…>`` tags are activated together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

from sara_train.engine.delta import FORMAT_NAME, LayerDelta, SparseDelta
from sara_train.engine.errors import SaRAError
from sara_train.engine.files import read_safetensors_header
from sara_train.export.diff import dense_update, diff_state_dict
from sara_train.export.layers import LORA_PREFIX, delta_in_naming, loader_layers

log = logging.getLogger("sara_webui")
TAG = "sara"
A1111_LAYER_PREFIX = "diffusion_model_"
"""How A1111's Lora extension names the UNet's modules in ``network_layer_mapping``."""


def is_sara_delta(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a native SaRA delta file (judged from its header; never unpickles)."""
    try:
        return read_safetensors_header(path).metadata.get("format") == FORMAT_NAME
    except SaRAError:
        return False


def sara_files(folders: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """``{name: path}`` of the SaRA deltas in ``folders`` (recursively), named by file stem; the
    first folder wins a name."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.safetensors")) if Path(folder).is_dir() else []:
            if is_sara_delta(path):
                found.setdefault(path.stem, path)
    return found


def sparse_module_class(network: ModuleType) -> type:
    """A ``network.NetworkModule`` subclass holding one layer's sparse update (the webui's base
    class: made at install time, as the webui's module is only known then)."""

    class SparseUpdateModule(network.NetworkModule):
        """One SaRA layer in A1111's network machinery: ``calc_updown`` is the dense update, scaled
        by the webui (``finalize_updown``: the tag's weight)."""

        def __init__(self, net, weights, layer: LayerDelta) -> None:
            super().__init__(net, weights)
            self.layer = layer

        def calc_updown(self, orig_weight: torch.Tensor):
            if tuple(orig_weight.shape) != tuple(self.layer.shape):
                raise SaRAError(
                    f"SaRA layer {self.network_key} has shape {self.layer.shape}, the model's weight "
                    f"{tuple(orig_weight.shape)}: the delta is for another model"
                )
            updown = dense_update(self.layer, torch.float32).to(orig_weight.device)
            return self.finalize_updown(updown, orig_weight, orig_weight.shape)

    return SparseUpdateModule


def a1111_network(networks: ModuleType, network: ModuleType, sd_model, name: str, network_on_disk):
    """A ``network.Network`` for a SaRA file: one ``SparseUpdateModule`` per weight layer, keyed by
    the model's ``network_layer_mapping``. The delta is fitted to the loaded model's tensors first
    (any key naming; SD UNets in diffusers names are translated). ``SaRAError`` when it does not
    fit (the delta is for another model) or has a bias layer (A1111's modules take weight updates).
    The base weights are not compared (the webui may hold other networks' updates at this point)."""
    delta = SparseDelta.load(network_on_disk.filename)
    model_shapes = {name: tuple(parameter.shape) for name, parameter in sd_model.model.named_parameters()}
    try:
        fitted = delta_in_naming(delta, "ldm", model_shapes)
    except SaRAError as error:
        raise SaRAError(f"{network_on_disk.filename}: {error}") from None
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if mapping is None:
        networks.assign_network_names_to_compvis_modules(sd_model)
        mapping = sd_model.network_layer_mapping
    module_class = sparse_module_class(network)
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    missing = []
    for file_key, (parameter, layer) in loader_layers(fitted).items():
        layer_name = A1111_LAYER_PREFIX + file_key.split(".", 1)[0].removeprefix(LORA_PREFIX)
        module = mapping.get(layer_name)
        if module is None or parameter != "weight":
            missing.append(layer_name if module is None else f"{layer_name} (bias)")
            continue
        weights = network.NetworkWeights(network_key=file_key, sd_key=layer_name, w={}, sd_module=module)
        net.modules[layer_name] = module_class(net, weights, layer)
    if missing:
        raise SaRAError(
            f"{network_on_disk.filename}: {len(missing)} of {len(delta.layers)} SaRA layers have no place in the "
            f"loaded model (e.g. {missing[:3]}): the delta is for another model"
        )
    return net


def install(
    networks: ModuleType,
    network: ModuleType,
    folders: list[str],
    shared=None,
    extra_networks: ModuleType | None = None,
    on_before_ui=None,
) -> str:
    """Hook SaRA files into the Lora extension ``networks`` / ``network``; returns the style hooked
    (``"a1111"`` or ``"forge"``). ``folders``: where SaRA files live (``models/sara``). ``shared``:
    the webui's ``modules.shared`` (its ``sd_model``; A1111 style only). The ``sara`` alias is
    registered with ``extra_networks`` now if the Lora extension's extra network exists, else in
    ``on_before_ui`` (the webui's callback registration), which runs after the Lora extension's own."""
    list_original = networks.list_available_networks

    def list_available_networks(*args, **kwargs):
        result = list_original(*args, **kwargs)
        for name, path in sara_files(folders).items():
            if name in networks.available_networks:
                log.warning("SaRA: %s is also a LoRA's name; <sara:%s> loads the LoRA", path, name)
                continue
            entry = network.NetworkOnDisk(name, str(path))
            networks.available_networks[name] = entry
            networks.available_network_aliases[name] = entry
        return result

    networks.list_available_networks = list_available_networks
    if hasattr(networks, "load_lora_state_dict"):  # Forge / reForge
        read_original = networks.load_lora_state_dict

        def load_lora_state_dict(filename, *args, **kwargs):
            if is_sara_delta(filename):
                return diff_state_dict(SparseDelta.load(filename))
            return read_original(filename, *args, **kwargs)

        networks.load_lora_state_dict = load_lora_state_dict
        style = "forge"
    else:
        load_original = networks.load_network

        def load_network(name, network_on_disk):
            if is_sara_delta(network_on_disk.filename):
                return a1111_network(networks, network, shared.sd_model, name, network_on_disk)
            return load_original(name, network_on_disk)

        networks.load_network = load_network
        style = "a1111"

    def register_tag() -> None:
        lora = getattr(networks, "extra_network_lora", None)
        if lora is None:
            log.warning("SaRA: the Lora extension has no extra network; <%s:…> tags are not available", TAG)
            return
        extra_networks.register_extra_network_alias(lora, TAG)

    if extra_networks is not None:
        if getattr(networks, "extra_network_lora", None) is not None:
            register_tag()
        elif on_before_ui is not None:
            on_before_ui(register_tag)
    list_available_networks()
    return style
