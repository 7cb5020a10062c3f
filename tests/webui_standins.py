"""Small stand-ins of the webui objects the SaRA extension touches, written from the webuis'
documented behaviour (no webui code): A1111's built-in Lora extension (``network``: networks on
disk, networks of per-layer modules whose ``finalize_updown`` scales by the tag's weight;
``networks``: the lists, ``load_network``, and per-layer application that backs the weight up
once and restores it before adding the active networks), Forge's variant (``load_lora_state_dict``
feeding its own loader), and ``modules`` (``extra_networks`` aliases, ``paths``, ``shared``,
``script_callbacks``). ``tests/test_webui_extension.py`` drives the extension through them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sara_train.engine.files import read_safetensors_header


def make_network_module() -> types.ModuleType:
    """A1111's ``network`` module: ``NetworkOnDisk``, ``Network``, ``NetworkWeights``, ``NetworkModule``."""
    network = types.ModuleType("network")

    class NetworkOnDisk:
        def __init__(self, name: str, filename: str) -> None:
            self.name = self.alias = name
            self.filename = filename
            self.metadata = read_safetensors_header(filename).metadata

    class Network:
        def __init__(self, name: str, network_on_disk: NetworkOnDisk) -> None:
            self.name = name
            self.network_on_disk = network_on_disk
            self.te_multiplier = self.unet_multiplier = 1.0
            self.modules: dict[str, object] = {}
            self.mtime = None

    @dataclass
    class NetworkWeights:
        network_key: str
        sd_key: str
        w: dict = field(default_factory=dict)
        sd_module: nn.Module | None = None

    class NetworkModule:
        def __init__(self, net: Network, weights: NetworkWeights) -> None:
            self.network = net
            self.network_key = weights.network_key
            self.sd_key = weights.sd_key
            self.sd_module = weights.sd_module
            self.scale = weights.w.get("scale")
            self.alpha = weights.w.get("alpha")
            self.dim = None

        def multiplier(self) -> float:
            return (
                self.network.unet_multiplier
                if self.sd_key.startswith("diffusion_model")
                else self.network.te_multiplier
            )

        def calc_scale(self) -> float:
            if self.scale is not None:
                return self.scale
            if self.dim is not None and self.alpha is not None:
                return self.alpha / self.dim
            return 1.0

        def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
            if orig_weight.numel() == updown.numel():
                updown = updown.reshape(orig_weight.shape)
            if ex_bias is not None:
                ex_bias = ex_bias * self.multiplier()
            return updown * self.calc_scale() * self.multiplier(), ex_bias

    for cls in (NetworkOnDisk, Network, NetworkWeights, NetworkModule):
        setattr(network, cls.__name__, cls)
    return network


def make_networks_module(network: types.ModuleType, lora_dir: Path, forge: bool = False) -> types.ModuleType:
    """A1111's ``networks`` (or, with ``forge``, Forge's: ``load_lora_state_dict`` instead of
    module building). ``load_networks(names, multipliers)`` activates; ``apply_weights(sd_model)``
    is the per-layer application the webui runs before sampling."""
    networks = types.ModuleType("networks")
    networks.available_networks = {}
    networks.available_network_aliases = {}
    networks.loaded_networks = []
    networks.extra_network_lora = None
    networks.loaded_state_dicts = []
    networks.layer_errors = {}

    def list_available_networks() -> None:
        networks.available_networks.clear()
        networks.available_network_aliases.clear()
        for path in sorted(Path(lora_dir).glob("*.safetensors")):
            entry = network.NetworkOnDisk(path.stem, str(path))
            networks.available_networks[path.stem] = networks.available_network_aliases[path.stem] = entry

    def assign_network_names_to_compvis_modules(sd_model) -> None:
        mapping = {}
        for name, module in sd_model.model.named_modules():
            mapping[name.replace(".", "_")] = module
            module.network_layer_name = name.replace(".", "_")
        sd_model.network_layer_mapping = mapping

    def load_network(name, network_on_disk):
        raise NotImplementedError(f"the stand-in loads only SaRA files, not {network_on_disk.filename}")

    def load_lora_state_dict(filename):
        return {"read by the original": load_file(filename)}

    def load_networks(names: list[str], multipliers: list[float]) -> None:
        networks.loaded_networks.clear()
        networks.loaded_state_dicts.clear()
        for name, multiplier in zip(names, multipliers):
            entry = networks.available_network_aliases[name]
            if forge:
                networks.loaded_state_dicts.append(networks.load_lora_state_dict(entry.filename))
                continue
            net = networks.load_network(name, entry)
            net.unet_multiplier = multiplier
            networks.loaded_networks.append(net)

    def apply_weights(sd_model) -> None:
        with torch.no_grad():
            for name, module in sd_model.network_layer_mapping.items():
                if getattr(module, "weight", None) is None:
                    continue
                if not hasattr(module, "network_weights_backup"):
                    module.network_weights_backup = module.weight.detach().clone()
                    bias = getattr(module, "bias", None)
                    module.network_bias_backup = None if bias is None else bias.detach().clone()
                module.weight.copy_(module.network_weights_backup)
                if module.network_bias_backup is not None:
                    module.bias.copy_(module.network_bias_backup)
                for net in networks.loaded_networks:
                    if name not in net.modules:
                        continue
                    try:
                        updown, ex_bias = net.modules[name].calc_updown(module.weight)
                    except RuntimeError:  # the webui counts a layer's error and goes on
                        networks.layer_errors[net.name] = networks.layer_errors.get(net.name, 0) + 1
                        continue
                    module.weight.copy_((module.weight.to(updown.dtype) + updown).to(module.weight.dtype))
                    if ex_bias is not None:
                        module.bias += ex_bias

    networks.list_available_networks = list_available_networks
    networks.load_networks = load_networks
    networks.apply_weights = apply_weights
    if forge:
        networks.load_lora_state_dict = load_lora_state_dict
    else:
        networks.load_network = load_network
        networks.assign_network_names_to_compvis_modules = assign_network_names_to_compvis_modules
    list_available_networks()
    return networks


def make_extra_networks_module() -> types.ModuleType:
    """``modules.extra_networks``: aliases, and ``initialize()`` which clears them (the webui calls it
    after loading the extensions' scripts, before the UI's callbacks run)."""
    extra_networks = types.ModuleType("modules.extra_networks")
    extra_networks.aliases = {}
    extra_networks.register_extra_network_alias = lambda instance, alias: extra_networks.aliases.update(
        {alias: instance}
    )
    extra_networks.initialize = extra_networks.aliases.clear
    return extra_networks


def module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """An ``nn.Module`` whose named parameters are ``state`` (containers made as the names need)."""
    root = nn.Module()
    for key, tensor in state.items():
        *path, parameter = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(parameter, nn.Parameter(tensor.clone(), requires_grad=False))
    return root


class StandInModel:
    """A1111's loaded model: ``.model`` wraps the UNet as ``diffusion_model``."""

    def __init__(self, ldm_unet_state: dict[str, torch.Tensor]) -> None:
        self.model = module_tree({"diffusion_model." + key: value for key, value in ldm_unet_state.items()})

    def unet_state(self) -> dict[str, torch.Tensor]:
        return {
            key.removeprefix("diffusion_model."): value.detach().clone()
            for key, value in self.model.state_dict().items()
        }
