"""A delta's layers under the names LoRA-folder loaders use.

Every loader of ``models/Lora`` files (A1111, Forge, reForge, ComfyUI's LoraLoader, SD.Next) finds
a layer by ``lora_unet_`` + its module path with dots replaced by underscores
(``input_blocks.1.1.proj_in.weight`` -> ``lora_unet_input_blocks_1_1_proj_in``). The module path
is the model's own name for it in one of two namings:

* ``ldm``: the original names, as in single-file checkpoints and ComfyUI models (for Stable
  Diffusion UNets the LDM names; for Flux and SD3 the original ones). A1111, Forge, reForge and
  ComfyUI read these; ComfyUI reads them for every family it loads.
* ``diffusers``: diffusers' module paths of a Stable Diffusion UNet, which SD.Next reads.

A delta saved by the ComfyUI nodes or by ``sara-train train`` already uses the original names, so
``ldm`` needs nothing else. Other combinations need the model's full list of tensors (``base``):
a delta layer alone cannot tell which of the UNet's blocks it belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from ..engine.apply import fit_delta
from ..engine.delta import LayerDelta, SparseDelta
from ..engine.errors import SaRAError
from ..families import flux, sd3
from ..families.identify import bare_key, delta_family
from ..families.sd_unet import (
    LDM_UNET_PREFIXES,
    diffusers_to_ldm_unet_keys,
    ldm_to_diffusers_unet_keys,
    rename_delta_keys,
    strip_ldm_prefix,
    target_unet,
    unet_key_naming,
)

Naming = Literal["ldm", "diffusers"]
NAMINGS: tuple[Naming, ...] = ("ldm", "diffusers")
LORA_PREFIX = "lora_unet_"
PARAMETER_SUFFIXES = {"weight": "diff", "bias": "diff_b"}
"""A parameter's name -> the suffix of its dense difference in the LyCORIS "full" format."""
Shapes = Mapping[str, Sequence[int]]


def own_naming(keys: Sequence[str]) -> Naming | None:
    """The naming a delta's keys are in, judged from the keys alone: ``ldm`` for keys under a
    ComfyUI / checkpoint prefix (``diffusion_model.``, any family) or original Stable Diffusion,
    Flux or SD3 names; ``diffusers`` for diffusers UNet, Flux or SD3 names; None otherwise."""
    if keys and all(key.startswith(LDM_UNET_PREFIXES) for key in keys):
        return "ldm"
    unet = unet_key_naming(keys)
    if unet is not None:
        return unet
    shapes = dict.fromkeys(keys, ())
    for naming in (flux.NAMING, sd3.NAMING):
        found = naming.delta_naming(shapes)
        if found is not None:
            return "ldm" if found[0] == "original" else "diffusers"
    return None


def model_shapes(naming: Naming, base: Shapes) -> dict[str, tuple[int, ...]]:
    """The bare tensor names and shapes of the model in ``base`` (a checkpoint's, a ComfyUI model's
    or a diffusers UNet/transformer's tensors) in ``naming``. Models of other families are taken as
    named under ``model.diffusion_model.`` / ``diffusion_model.`` (else bare). ``SaRAError`` when
    ``naming`` is ``diffusers`` for a model that is not a Stable Diffusion UNet."""
    shapes = {key: tuple(shape) for key, shape in base.items()}
    unet_naming, layout = target_unet(shapes)
    if unet_naming is not None:
        bare = {strip_ldm_prefix(key): shape for key, shape in shapes.items()}
        if unet_naming == "ldm":
            bare = {key: shape for key, shape in bare.items() if unet_key_naming([key]) == "ldm"}
        if unet_naming == naming:
            return bare
        rename = diffusers_to_ldm_unet_keys if naming == "ldm" else ldm_to_diffusers_unet_keys
        return {new: bare[old] for old, new in rename(bare, layout).items()}
    if naming == "diffusers":
        raise SaRAError(
            "the diffusers naming (SD.Next) is for Stable Diffusion UNets; the base holds no SD1/SD2/SDXL UNet"
        )
    for family in (flux.NAMING, sd3.NAMING):
        found = family.target_model(shapes)
        if found is not None:
            side, _, bare = found
            return bare if side == "original" else family.original_shapes(bare)
    prefixed = [key for key in shapes if key.startswith(LDM_UNET_PREFIXES)]
    return {strip_ldm_prefix(key): shapes[key] for key in (prefixed or shapes)}


def delta_in_naming(delta: SparseDelta, naming: Naming, base: Shapes | None = None) -> SparseDelta:
    """``delta`` keyed by bare module paths + parameter name in ``naming``
    (``input_blocks.1.1.proj_in.weight``), fitted to ``base`` when given (see ``model_shapes``;
    through the engine's delta path, so a fused q/k/v tensor is assembled from its parts).

    Without ``base`` the delta's own keys must be in ``naming`` (``own_naming``; a delta the ComfyUI
    node saved, which records ``base_model_type``, is in ComfyUI's names whatever the family); else
    ``SaRAError`` saying to pass the base model.
    """
    if naming not in NAMINGS:
        raise SaRAError(f"naming must be one of {NAMINGS}, got {naming!r}")
    if base is not None:
        return fit_delta(delta, model_shapes(naming, base), "the base model")
    # saved by the ComfyUI node SaRA Train: ComfyUI's own names, for any family it loads
    own = "ldm" if "base_model_type" in delta.metadata else own_naming(list(delta.layers))
    if own is None:
        raise SaRAError(
            "cannot tell which model's names the delta's keys are "
            f"(e.g. {list(delta.layers)[:2]}); pass the base model it was trained on"
        )
    if own != naming:
        raise SaRAError(
            f"the delta's keys use {own} names; {naming} names need the base model's full list of tensors "
            "to translate them (pass the base checkpoint or diffusers folder)"
        )
    return rename_delta_keys(delta, {key: bare_key(key) for key in delta.layers})


def loader_layers(delta: SparseDelta) -> dict[str, tuple[str, LayerDelta]]:
    """``{LoRA-folder name: (parameter, layer)}`` for a delta keyed by bare module paths
    (``delta_in_naming``): ``input_blocks.1.1.proj_in.weight`` -> ``lora_unet_input_blocks_1_1_proj_in``,
    ``"weight"``. ``SaRAError`` naming the keys whose parameter is not a weight or bias (the
    loaders have no slot for them)."""
    layers: dict[str, tuple[str, LayerDelta]] = {}
    unsupported = []
    for key, layer in delta.layers.items():
        module, _, parameter = key.rpartition(".")
        if parameter not in PARAMETER_SUFFIXES or not module:
            unsupported.append(key)
            continue
        layers[f"{LORA_PREFIX}{module.replace('.', '_')}.{PARAMETER_SUFFIXES[parameter]}"] = (parameter, layer)
    if unsupported:
        raise SaRAError(
            f"{len(unsupported)} delta layers are neither a module's weight nor its bias (e.g. {unsupported[:3]}); "
            "LoRA-folder loaders have no name for them"
        )
    return layers


BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
"""Family -> the ``ss_base_model_version`` kohya-style trainers write (the webuis' Lora tab reads
``sd_v1``/``sd_v2``/``sdxl_*``)."""
MODELSPEC_ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora",
    "flux1": "flux-1-dev/lora",
}
"""``ss_base_model_version`` -> the ``modelspec.architecture`` Forge's Lora tab reads (it knows Flux only so)."""


def loader_metadata(
    delta: SparseDelta, output_name: str, base_model_version: str | None, network: Mapping[str, str]
) -> dict[str, str]:
    """The safetensors metadata of an exported file: what the webuis' Lora tab reads
    (``ss_output_name``, ``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``), the
    ``network`` entries (e.g. ``ss_network_module``), and where it came from (``sara_delta``: the
    delta's content hash)."""
    metadata = {"ss_output_name": output_name, **network, "sara_delta": delta.content_hash()}
    if base_model_version:
        metadata["ss_base_model_version"] = base_model_version
        metadata["ss_v2"] = str(base_model_version == "sd_v2")
        if base_model_version in MODELSPEC_ARCHITECTURES:
            metadata["modelspec.architecture"] = MODELSPEC_ARCHITECTURES[base_model_version]
    return metadata


def base_model_version_of(delta: SparseDelta, given: str | None) -> str | None:
    """``given`` if set, else the version of the family ``delta_family`` finds (None if unknown)."""
    return given or BASE_MODEL_VERSIONS.get(delta_family(delta) or "")
