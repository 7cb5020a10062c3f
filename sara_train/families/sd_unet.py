"""Stable Diffusion UNets (SD1.x, SD2.x, SDXL): diffusers ``UNet2DConditionModel`` names <-> the
original Stable Diffusion ("LDM") names that single-file checkpoints and ComfyUI use.

``StableDiffusionUNetNaming`` registers this knowledge with the engine's delta path, so a delta in
either naming fits a UNet, state dict or checkpoint in the other. The trainer also renames its
deltas to LDM names when saving (``delta_to_ldm_keys``).

The LDM UNet is three flat lists of numbered blocks, each block a list of numbered modules:

* ``input_blocks.0.0`` is ``conv_in``. Then, for every down block ``b`` and each of its
  ``layers_per_block`` layers, one input block ``[resnet, attention?]`` (``.0`` = ``resnets.l``,
  ``.1`` = ``attentions.l``), and after every down block but the last one input block holding the
  downsampler (``input_blocks.N.0.op`` = ``down_blocks.b.downsamplers.0.conv``).
* ``middle_block.0`` / ``.1`` / ``.2`` are ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
* For every up block ``b``, ``layers + 1`` output blocks ``[resnet, attention?, upsampler?]``; the
  upsampler (``up_blocks.b.upsamplers.0.conv``) sits in the block's last output block, at module
  ``.2`` after an attention or ``.1`` without one. The last up block has none.
* ``time_embed.0/.2`` = ``time_embedding.linear_1/_2``, ``label_emb.0.0/.2`` =
  ``add_embedding.linear_1/_2`` (SDXL), ``out.0`` = ``conv_norm_out``, ``out.2`` = ``conv_out``.

Inside a resnet the sub-modules are renamed (``in_layers.0`` = ``norm1``, ``in_layers.2`` =
``conv1``, ``emb_layers.1`` = ``time_emb_proj``, ``out_layers.0`` = ``norm2``, ``out_layers.3`` =
``conv2``, ``skip_connection`` = ``conv_shortcut``); inside an attention (``SpatialTransformer`` /
``Transformer2DModel``) the names are the same in both. Tensors never change shape or values.

LDM keys here are bare (``input_blocks.1.1.proj_in.weight``); checkpoints prefix them with
``model.diffusion_model.`` and ComfyUI models with ``diffusion_model.``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.apply import Placement, Shapes, whole
from ..engine.delta import SparseDelta
from ..engine.errors import DeltaMismatchError, SaRAError
from ..engine.keys import resolve_keys

LDM_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
"""Prefixes under which LDM UNet keys appear: single-file checkpoints, ComfyUI models."""

DOWN_BLOCK_ATTENTION = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCK_ATTENTION = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

RESNET_PARTS = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
"""(diffusers, LDM) names of a resnet's sub-modules."""

SINGLE_MODULES = (
    ("conv_in.", "input_blocks.0.0."),
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
)
"""(diffusers, LDM) prefixes of the modules outside the block lists."""

LDM_TOP_LEVEL = {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}
DIFFUSERS_TOP_LEVEL = {
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_in",
    "conv_norm_out",
    "conv_out",
    "time_embedding",
    "add_embedding",
}

ModuleKind = Literal["resnet", "attention", "leaf"]


@dataclass(frozen=True)
class ModuleName:
    """One module of the UNet under both namings (prefixes end with a dot).

    ``kind``: "resnet" (sub-modules renamed by ``RESNET_PARTS``), "attention" (sub-keys kept as
    they are) or "leaf" (a conv/linear/norm: only ``weight`` and ``bias`` follow the prefix).
    """

    diffusers: str
    ldm: str
    kind: ModuleKind


def unet_module_names(unet_config: Mapping[str, Any]) -> list[ModuleName]:
    """Every module of a UNet with this config, under both namings.

    ``unet_config``: a diffusers UNet2DConditionModel config (``unet.config`` or its config.json);
    uses ``layers_per_block``, ``down_block_types``, ``up_block_types`` and ``mid_block_type``.
    Raises ``SaRAError`` for block types that have no LDM counterpart.
    """
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _layers_per_block(unet_config["layers_per_block"], len(down_types))
    if len(up_types) != len(down_types):
        raise SaRAError(f"UNet config has {len(down_types)} down blocks but {len(up_types)} up blocks")
    names = [ModuleName(diffusers, ldm, "leaf") for diffusers, ldm in SINGLE_MODULES]
    index = 1
    for block, block_type in enumerate(down_types):
        has_attention = _block_attention(block_type, DOWN_BLOCK_ATTENTION)
        for layer in range(layers[block]):
            names.append(ModuleName(f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", "resnet"))
            if has_attention:
                names.append(
                    ModuleName(f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.", "attention")
                )
            index += 1
        if block < len(down_types) - 1:
            names.append(
                ModuleName(f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", "leaf")
            )
            index += 1
    mid_type = unet_config.get("mid_block_type", MID_BLOCK_TYPE)
    if mid_type == MID_BLOCK_TYPE:
        names += [
            ModuleName("mid_block.resnets.0.", "middle_block.0.", "resnet"),
            ModuleName("mid_block.attentions.0.", "middle_block.1.", "attention"),
            ModuleName("mid_block.resnets.1.", "middle_block.2.", "resnet"),
        ]
    elif mid_type is not None:
        raise SaRAError(f"UNet mid block type {mid_type!r} has no LDM naming (expected {MID_BLOCK_TYPE!r} or None)")
    index = 0
    for block, block_type in enumerate(up_types):
        has_attention = _block_attention(block_type, UP_BLOCK_ATTENTION)
        for layer in range(layers[len(up_types) - 1 - block] + 1):
            names.append(ModuleName(f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", "resnet"))
            if has_attention:
                names.append(
                    ModuleName(f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.", "attention")
                )
            index += 1
        if block < len(up_types) - 1:
            position = 2 if has_attention else 1
            names.append(
                ModuleName(
                    f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{index - 1}.{position}.conv.", "leaf"
                )
            )
    return names


def full_resolution_modules(unet_config: Mapping[str, Any]) -> list[str]:
    """Regexes (for ``SaRAConfig.exclude``) naming the diffusers UNet modules whose output is at the
    latent's full resolution: ``conv_in``, the first down block (its downsampler aside), the last
    up block, the upsampler feeding it, and ``conv_out``. In SD1.5 they hold ~3 % of the weights but
    about a third of the weight-gradient FLOPs and most of the activations SaRA saves."""
    last = len(unet_config["up_block_types"]) - 1
    return [
        r"^conv_in$",
        r"^down_blocks\.0\.(resnets|attentions)\.",
        rf"^up_blocks\.{last}\.",
        rf"^up_blocks\.{last - 1}\.upsamplers\.",
        r"^conv_out$",
    ]


def diffusers_to_ldm_unet_keys(keys: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers key: bare LDM key}`` for UNet state-dict ``keys``; ``SaRAError`` names any key
    that has no LDM name."""
    return _rename(keys, unet_config, to_ldm=True)


def ldm_to_diffusers_unet_keys(keys: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{LDM key: diffusers key}``; keys may carry one of ``LDM_UNET_PREFIXES``, which is dropped.
    ``SaRAError`` names any key that has no diffusers name."""
    return _rename(keys, unet_config, to_ldm=False)


def strip_ldm_prefix(key: str) -> str:
    """``key`` without a leading ``model.diffusion_model.`` or ``diffusion_model.``."""
    for prefix in LDM_UNET_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def unet_key_naming(keys: Iterable[str]) -> Literal["ldm", "diffusers"] | None:
    """Which naming the UNet keys ``keys`` use, judged by their first component (after any LDM
    prefix); None if they are empty or mix namings or are no UNet keys."""
    tops = {strip_ldm_prefix(key).split(".", 1)[0] for key in keys}
    if tops and tops <= LDM_TOP_LEVEL:
        return "ldm"
    if tops and tops <= DIFFUSERS_TOP_LEVEL:
        return "diffusers"
    return None


def unet_layout_from_ldm_keys(keys: Iterable[str]) -> dict[str, Any]:
    """The diffusers config fields ``unet_module_names`` needs, read off a full LDM UNet's keys.

    ``keys``: bare LDM UNet keys, or a whole checkpoint's keys (then only those under one of
    ``LDM_UNET_PREFIXES`` are used). Down levels end at the ``input_blocks.N.0.op`` downsamplers;
    a block has attention when it holds a ``.1.proj_in`` (every SpatialTransformer has one).
    Raises ``SaRAError`` if there is no LDM UNet or a key does not fit the layout found.
    """
    keys = list(keys)
    prefixed = [key for key in keys if key.startswith(LDM_UNET_PREFIXES)]
    bare = {strip_ldm_prefix(key) for key in (prefixed or keys)}
    input_indices = sorted({int(m.group(1)) for k in bare if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    if not input_indices or input_indices[0] != 0:
        raise SaRAError("no LDM UNet keys (input_blocks.0.0.*) found")
    levels: list[list[int]] = [[]]
    for index in input_indices[1:]:
        if f"input_blocks.{index}.0.op.weight" in bare:
            levels.append([])
        else:
            levels[-1].append(index)
    layers = [len(level) for level in levels]
    down_types = [
        "CrossAttnDownBlock2D" if any(f"input_blocks.{i}.1.proj_in.weight" in bare for i in level) else "DownBlock2D"
        for level in levels
    ]
    up_types = []
    first = 0
    for up_layers in reversed(layers):
        blocks = range(first, first + up_layers + 1)
        up_types.append(
            "CrossAttnUpBlock2D" if any(f"output_blocks.{i}.1.proj_in.weight" in bare for i in blocks) else "UpBlock2D"
        )
        first += up_layers + 1
    layout = {
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": MID_BLOCK_TYPE if any(k.startswith("middle_block.") for k in bare) else None,
    }
    try:
        ldm_to_diffusers_unet_keys(bare, layout)
    except SaRAError as exc:
        raise SaRAError(f"the LDM UNet keys do not form a Stable Diffusion UNet layout: {exc}") from None
    return layout


def delta_to_ldm_keys(delta: SparseDelta, unet_config: Mapping[str, Any], prefix: str = "") -> SparseDelta:
    """A copy of ``delta`` (same tensors, selection, metadata) whose diffusers UNet keys are
    renamed to LDM keys with ``prefix`` in front (bare by default: they then match both
    ``model.diffusion_model.*`` checkpoints and ComfyUI's ``diffusion_model.*``).

    Its ``base_fingerprint`` differs from ``delta``'s (the fingerprint covers key names).
    """
    mapping = diffusers_to_ldm_unet_keys(delta.layers, unet_config)
    return rename_delta_keys(delta, {key: prefix + ldm for key, ldm in mapping.items()})


def delta_to_diffusers_keys(delta: SparseDelta, unet_config: Mapping[str, Any]) -> SparseDelta:
    """A copy of ``delta`` whose LDM UNet keys (bare or prefixed) are renamed to diffusers keys."""
    return rename_delta_keys(delta, ldm_to_diffusers_unet_keys(delta.layers, unet_config))


def unet_layout_from_diffusers_keys(keys: Iterable[str]) -> dict[str, Any]:
    """The config fields ``unet_module_names`` needs, read off a whole diffusers UNet's keys (down
    and up blocks by their resnets and attentions, the mid block by its presence). Raises
    ``SaRAError`` if the keys are not a diffusers Stable Diffusion UNet."""
    keys = set(keys)

    def blocks(kind: str) -> list[int]:
        return sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{kind}\.(\d+)\.", k))})

    def count(prefix: str) -> int:
        return len({m.group(1) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))})

    downs, ups = blocks("down_blocks"), blocks("up_blocks")
    if not downs or downs != list(range(len(downs))) or ups != downs or "conv_in.weight" not in keys:
        raise SaRAError("no diffusers UNet keys (conv_in, down_blocks.N, up_blocks.N) found")

    def attention(kind: str, block: int) -> bool:
        return any(k.startswith(f"{kind}.{block}.attentions.") for k in keys)

    layers = [count(f"down_blocks.{b}.resnets.") for b in downs]
    layout = {
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if attention("down_blocks", b) else "DownBlock2D" for b in downs],
        "up_block_types": ["CrossAttnUpBlock2D" if attention("up_blocks", b) else "UpBlock2D" for b in ups],
        "mid_block_type": MID_BLOCK_TYPE if any(k.startswith("mid_block.") for k in keys) else None,
    }
    try:
        diffusers_to_ldm_unet_keys(keys, layout)
    except SaRAError as exc:
        raise SaRAError(f"the diffusers UNet keys do not form a Stable Diffusion UNet layout: {exc}") from None
    return layout


def target_unet(keys: Iterable[str]) -> tuple[Literal["ldm", "diffusers"] | None, dict[str, Any] | None]:
    """Which naming a target's whole UNet uses and its layout: ``("ldm", layout)`` for original keys
    (bare, ``diffusion_model.*`` or a checkpoint's ``model.diffusion_model.*``), ``("diffusers",
    layout)`` for a diffusers UNet's, ``(None, None)`` for anything else."""
    keys = list(keys)
    if any(strip_ldm_prefix(key).startswith("input_blocks.0.0.") for key in keys):
        try:
            return "ldm", unet_layout_from_ldm_keys(keys)
        except SaRAError:
            return None, None
    if "conv_in.weight" in keys:
        try:
            return "diffusers", unet_layout_from_diffusers_keys(keys)
        except SaRAError:
            return None, None
    return None, None


class StableDiffusionUNetNaming:
    """The engine's ``KeyNaming`` for Stable Diffusion UNets: places a delta named one way (diffusers
    or LDM) on a target named the other way, the UNet layout being read off the target's keys."""

    description = "Stable Diffusion UNet naming (diffusers <-> original)"

    def place(self, delta: Shapes, target: Shapes) -> dict[str, Placement] | None:
        delta_naming = unet_key_naming(delta)
        target_naming, layout = target_unet(target)
        if delta_naming is None or target_naming is None or target_naming == delta_naming:
            return None
        try:
            renamed = (diffusers_to_ldm_unet_keys if target_naming == "ldm" else ldm_to_diffusers_unet_keys)(
                delta, layout
            )
        except SaRAError as exc:
            raise DeltaMismatchError(
                f"the delta does not fit the target's UNet: {exc}; the delta is for another model architecture"
            ) from None
        mapping = resolve_keys(renamed.values(), target, "the target's UNet")
        return {key: whole(mapping[renamed[key]], shape) for key, shape in delta.items()}


def rename_delta_keys(delta: SparseDelta, mapping: Mapping[str, str]) -> SparseDelta:
    """A ``SparseDelta`` holding ``delta``'s layer objects under ``mapping[key]``; every key must be
    mapped, to distinct names (else ``SaRAError``)."""
    missing = [key for key in delta.layers if key not in mapping]
    if missing:
        raise SaRAError(f"no new name for delta keys {missing[:3]}")
    renamed = {mapping[key]: layer for key, layer in delta.layers.items()}
    if len(renamed) != len(delta.layers):
        raise SaRAError("renaming the delta's keys would merge two layers into one name")
    return SparseDelta(renamed, delta.selection, delta.metadata)


def _rename(keys: Iterable[str], unet_config: Mapping[str, Any], to_ldm: bool) -> dict[str, str]:
    names = unet_module_names(unet_config)
    by_prefix = {(name.diffusers if to_ldm else name.ldm): name for name in names}
    parts = {(ours if to_ldm else ldm): (ldm if to_ldm else ours) for ours, ldm in RESNET_PARTS}
    source_naming = "diffusers" if to_ldm else "LDM"
    mapping = {}
    for key in keys:
        bare = key if to_ldm else strip_ldm_prefix(key)
        renamed = _rename_key(bare, by_prefix, parts, to_ldm)
        if renamed is None:
            raise SaRAError(
                f"UNet key {key!r} has no counterpart in the other naming: not a {source_naming} "
                f"UNet key of a model with down blocks {list(unet_config['down_block_types'])} "
                f"and layers_per_block={unet_config['layers_per_block']}"
            )
        mapping[key] = renamed
    return mapping


def _rename_key(key: str, by_prefix: Mapping[str, ModuleName], parts: Mapping[str, str], to_ldm: bool) -> str | None:
    cuts = [i + 1 for i, char in enumerate(key) if char == "."]
    for cut in reversed(cuts):
        name = by_prefix.get(key[:cut])
        if name is None:
            continue
        target, rest = (name.ldm if to_ldm else name.diffusers), key[cut:]
        if name.kind == "attention":
            return target + rest
        if name.kind == "leaf":
            return target + rest if rest in ("weight", "bias") else None
        part, _, leaf = rest.rpartition(".")
        renamed_part = parts.get(part + ".")
        return target + renamed_part + leaf if renamed_part and leaf in ("weight", "bias") else None
    return None


def _layers_per_block(value: int | Iterable[int], num_blocks: int) -> list[int]:
    layers = [int(value)] * num_blocks if isinstance(value, int) else [int(v) for v in value]
    if len(layers) != num_blocks:
        raise SaRAError(f"layers_per_block={value} does not give one count per down block ({num_blocks})")
    return layers


def _block_attention(block_type: str, known: Mapping[str, bool]) -> bool:
    if block_type not in known:
        raise SaRAError(f"UNet block type {block_type!r} has no LDM naming (expected one of {sorted(known)})")
    return known[block_type]
