"""SaRA Merge Checkpoint / SaRA Merge Diffusion Model: bake deltas into a new model file (streaming,
atomic). One node per ComfyUI model folder, so each lists the files its own loader reads:
checkpoints (CheckpointLoaderSimple) and diffusion models (UNETLoader: Flux, SD3.5, Qwen-Image,
Wan... as distributed). Keys in the file may be in any naming ``fit_delta`` knows."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

import sara_train

from .common import NONE, numbered_path

DELTA_SLOTS = 3


def merge_inputs(file_input: str, folder: str, default_prefix: str) -> list:
    """The inputs of a merge node: the model file from ``folder``, ``DELTA_SLOTS`` (delta, strength)
    pairs (the first required) and the output's filename prefix."""
    deltas = folder_paths.get_filename_list("sara")
    inputs = [
        io.Combo.Input(
            file_input,
            options=folder_paths.get_filename_list(folder),
            tooltip=f"A .safetensors file in models/{folder}.",
        )
    ]
    for slot in range(1, DELTA_SLOTS + 1):
        inputs += [
            io.Combo.Input(
                f"delta_{slot}",
                options=deltas if slot == 1 else [NONE, *deltas],
                default=None if slot == 1 else NONE,
            ),
            io.Float.Input(f"strength_{slot}", default=1.0, min=-10.0, max=10.0, step=0.01),
        ]
    inputs.append(
        io.String.Input(
            "filename_prefix",
            default=default_prefix,
            tooltip=f"Saved as models/{folder}/<prefix>_<NNNNN>_.safetensors with the next free number "
            "(ComfyUI's numbering: nothing is overwritten); may name a subfolder.",
        )
    )
    return inputs


def merge_into_folder(folder: str, file_name: str, filename_prefix: str, slots: dict) -> str:
    """Merge the chosen deltas into ``models/<folder>/<file_name>``; returns the new file's path."""
    deltas, strengths = [], []
    for slot in range(1, DELTA_SLOTS + 1):
        name = slots.get(f"delta_{slot}", NONE)
        if name and name != NONE:
            deltas.append(folder_paths.get_full_path_or_raise("sara", name))
            strengths.append(float(slots[f"strength_{slot}"]))
    source = folder_paths.get_full_path_or_raise(folder, file_name)
    out = numbered_path(folder_paths.get_folder_paths(folder)[0], filename_prefix)
    sara_train.merge_checkpoint(source, deltas, out, strengths)
    return out


DESCRIPTION = (
    "Write a new {what} = {what} + strength × each delta. Streams tensor by tensor, so memory stays "
    "near the largest tensor; the file appears only when complete. Load it with {loader}."
)


class SaRAMergeCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRAMergeCheckpoint",
            display_name="SaRA Merge Checkpoint",
            category="sara",
            description=DESCRIPTION.format(what="checkpoint", loader="Load Checkpoint"),
            inputs=merge_inputs("ckpt_name", "checkpoints", "sara_merged"),
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ckpt_name: str, filename_prefix: str, **slots) -> io.NodeOutput:
        return io.NodeOutput(merge_into_folder("checkpoints", ckpt_name, filename_prefix, slots))


class SaRAMergeDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRAMergeDiffusionModel",
            display_name="SaRA Merge Diffusion Model",
            category="sara",
            description=DESCRIPTION.format(what="diffusion model file", loader="Load Diffusion Model"),
            inputs=merge_inputs("unet_name", "diffusion_models", "sara_merged"),
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, unet_name: str, filename_prefix: str, **slots) -> io.NodeOutput:
        return io.NodeOutput(merge_into_folder("diffusion_models", unet_name, filename_prefix, slots))
