"""Hooks into a webui's built-in Lora extension (its ``networks`` and ``network`` modules) that make
native SaRA delta files load like LoRAs, so ``<sara:name:weight>`` (and ``<lora:name:weight>``)
works with the webui's own weight backup and restore.

* Listing: after the extension lists ``models/Lora``, the ``.safetensors`` files of the SaRA
  folders are added to ``networks.available_networks`` (a name a LoRA already has is left to it).
  They appear as cards in the Lora tab.
* Loading, A1111 style (``networks.load_network`` builds a ``network.Network`` of
  ``NetworkModule`` s): a SaRA file becomes one ``SparseUpdateModule`` per module, found by the
  layer names the extension uses for the loaded model (``network_layer_mapping``:
  ``diffusion_model_<module path with underscores>``). Its ``calc_updown`` scatters the sparse
  values into a dense update (and bias update) only while the webui applies it; the webui scales
  it by the tag's weight, backs up the weight and restores it.
* Loading, Forge / reForge style (``networks.load_lora_state_dict`` feeds a ComfyUI-derived loader):
  a SaRA file is read as the LyCORIS "full" difference that loader reads natively, fitted to the
  loaded model first (so any key naming works). It is dense: about the touched layers' size.
* Installing twice (the webui's "Reload UI" re-runs the script on the same modules) hooks once.
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
from sara_train.export.layers import PARAMETER_SUFFIXES, delta_in_naming

log = logging.getLogger("sara_webui")
TAG = "sara"
A1111_LAYER_PREFIX = "diffusion_model_"
"""How A1111's Lora extension names the UNet's modules in ``network_layer_mapping``."""


def is_sara_delta(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a native SaRA delta file (judged from its header; never unpickles). A file
    that cannot be read is not one."""
    try:
        return read_safetensors_header(path).metadata.get("format") == FORMAT_NAME
    except (SaRAError, OSError):
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
    """A ``network.NetworkModule`` subclass holding one module's sparse weight and bias updates (the
    webui's base class: made at install time, as the webui's module is only known then)."""

    class SparseUpdateModule(network.NetworkModule):
        """One module's SaRA update in A1111's network machinery: ``calc_updown`` returns the dense
        weight update and bias update, scaled by the webui (``finalize_updown``: the tag's weight)."""

        def __init__(self, net, weights, weight: LayerDelta | None, bias: LayerDelta | None) -> None:
            super().__init__(net, weights)
            self.weight_update, self.bias_update = weight, bias

        def calc_updown(self, orig_weight: torch.Tensor):
            if self.weight_update is not None and tuple(orig_weight.shape) != tuple(self.weight_update.shape):
                # A1111 counts a RuntimeError as this layer's error and goes on; anything else stops the image
                raise RuntimeError(
                    f"SaRA layer {self.sd_key} has shape {self.weight_update.shape}, the model's weight "
                    f"{tuple(orig_weight.shape)}: the delta is for another model"
                )
            if self.weight_update is None:
                updown = torch.zeros(orig_weight.shape, dtype=torch.float32, device=orig_weight.device)
            else:
                updown = dense_update(self.weight_update, torch.float32).to(orig_weight.device)
            bias = None
            if self.bias_update is not None:
                bias = dense_update(self.bias_update, torch.float32).to(orig_weight.device, orig_weight.dtype)
            return self.finalize_updown(updown, orig_weight, orig_weight.shape, bias)

    return SparseUpdateModule


def model_tensor_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``model``'s parameters (what a delta is fitted to)."""
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def fitted_delta(path: str | os.PathLike, model_shapes: dict[str, tuple[int, ...]] | None) -> SparseDelta:
    """The SaRA file at ``path`` in bare original (LDM) names, fitted to the loaded model's tensors
    when known (any naming of the delta then works); ``SaRAError`` naming the file otherwise."""
    delta = SparseDelta.load(path)
    try:
        return delta_in_naming(delta, "ldm", model_shapes)
    except SaRAError as error:
        raise SaRAError(f"{path}: {error}") from None


def a1111_network(networks: ModuleType, network: ModuleType, sd_model, name: str, network_on_disk):
    """A ``network.Network`` for a SaRA file: one ``SparseUpdateModule`` per updated module, keyed by
    the model's ``network_layer_mapping``. ``SaRAError`` when the delta does not fit the loaded
    model's tensors (it is for another model). The base weights are not compared (the webui may
    hold other networks' updates at this point)."""
    fitted = fitted_delta(network_on_disk.filename, model_tensor_shapes(sd_model.model))
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if mapping is None:
        networks.assign_network_names_to_compvis_modules(sd_model)
        mapping = sd_model.network_layer_mapping
    updates: dict[str, dict[str, LayerDelta]] = {}
    for key, layer in fitted.layers.items():
        module_path, _, parameter = key.rpartition(".")
        if parameter not in PARAMETER_SUFFIXES:
            raise SaRAError(
                f"{network_on_disk.filename}: {key} is neither a weight nor a bias; A1111 has no slot for it"
            )
        updates.setdefault(A1111_LAYER_PREFIX + module_path.replace(".", "_"), {})[parameter] = layer
    missing = [layer_name for layer_name in updates if layer_name not in mapping]
    if missing:
        raise SaRAError(
            f"{network_on_disk.filename}: {len(missing)} modules are not in the webui's layer map "
            f"(e.g. {missing[:3]}): the delta is for another model"
        )
    module_class = sparse_module_class(network)
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    for layer_name, parameters in updates.items():
        weights = network.NetworkWeights(
            network_key=layer_name, sd_key=layer_name, w={}, sd_module=mapping[layer_name]
        )
        net.modules[layer_name] = module_class(net, weights, parameters.get("weight"), parameters.get("bias"))
    return net


def forge_model_shapes(shared) -> dict[str, tuple[int, ...]] | None:
    """The loaded Forge model's tensor names and shapes (``diffusion_model.*``), None if none is loaded."""
    patcher = getattr(getattr(getattr(shared, "sd_model", None), "forge_objects", None), "unet", None)
    model = getattr(patcher, "model", None)
    return model_tensor_shapes(model) if isinstance(model, torch.nn.Module) else None


def forge_state_dict(path: str | os.PathLike, model_shapes: dict[str, tuple[int, ...]] | None) -> dict:
    """The SaRA file at ``path`` as the "full" difference Forge's loader reads, fitted to the loaded
    model's tensors when known; ``SaRAError`` naming the file otherwise."""
    try:
        return diff_state_dict(SparseDelta.load(path), base=model_shapes)
    except SaRAError as error:
        raise SaRAError(f"{path}: {error}") from None


HOOKED = "__sara_hook__"
"""Attribute marking a function this module installed (so a second ``install`` does not wrap it again)."""


def hook(module: ModuleType, name: str, make) -> None:
    """Replace ``module.name`` by ``make(original)`` unless it already is one of these hooks."""
    original = getattr(module, name)
    if getattr(original, HOOKED, False):
        return
    replacement = make(original)
    setattr(replacement, HOOKED, True)
    setattr(module, name, replacement)


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
    the webui's ``modules.shared`` (its loaded model). The ``sara`` alias is registered with
    ``extra_networks`` in ``on_before_ui`` when given (the webui's callback registration: it runs
    after the Lora extension has made its extra network, and after "Reload UI" has cleared the
    aliases), else at once. Installing again on the same modules changes nothing."""

    def add_sara_networks() -> None:
        for name, path in sara_files(folders).items():
            if name in networks.available_networks:
                log.warning("SaRA: %s is also a LoRA's name; <sara:%s> loads the LoRA", path, name)
                continue
            entry = network.NetworkOnDisk(name, str(path))
            networks.available_networks[name] = entry
            networks.available_network_aliases[name] = entry

    def listing(original):
        def list_available_networks(*args, **kwargs):
            result = original(*args, **kwargs)
            add_sara_networks()
            return result

        return list_available_networks

    hook(networks, "list_available_networks", listing)
    if hasattr(networks, "load_lora_state_dict"):  # Forge / reForge

        def reading(original):
            def load_lora_state_dict(filename, *args, **kwargs):
                if is_sara_delta(filename):
                    return forge_state_dict(filename, forge_model_shapes(shared))
                return original(filename, *args, **kwargs)

            return load_lora_state_dict

        hook(networks, "load_lora_state_dict", reading)
        style = "forge"
    else:

        def loading(original):
            def load_network(name, network_on_disk):
                if is_sara_delta(network_on_disk.filename):
                    return a1111_network(networks, network, shared.sd_model, name, network_on_disk)
                return original(name, network_on_disk)

            return load_network

        hook(networks, "load_network", loading)
        style = "a1111"

    def register_tag() -> None:
        lora = getattr(networks, "extra_network_lora", None)
        if lora is None:
            log.warning("SaRA: the Lora extension has no extra network; <%s:…> tags are not available", TAG)
            return
        extra_networks.register_extra_network_alias(lora, TAG)

    if extra_networks is not None:
        if on_before_ui is not None:
            on_before_ui(register_tag)
        else:
            register_tag()
    add_sara_networks()  # the Lora extension listed its folder when it loaded; only ours are missing
    return style
