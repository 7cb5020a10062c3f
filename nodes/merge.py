"""SaRA Merge Checkpoint: bake deltas into a new single-file checkpoint (streaming, atomic)."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

import sara_train

from .common import NONE, numbered_path

DELTA_SLOTS = 3


class SaRAMergeCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        deltas = folder_paths.get_filename_list("sara")
        inputs = [
            io.Combo.Input(
                "ckpt_name",
                options=folder_paths.get_filename_list("checkpoints"),
                tooltip="A .safetensors checkpoint in models/checkpoints.",
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
                default="sara_merged",
                tooltip="Saved as models/checkpoints/<prefix>_<NNNNN>_.safetensors with the next free number "
                "(ComfyUI's numbering: nothing is overwritten); may name a subfolder.",
            )
        )
        return io.Schema(
            node_id="SaRAMergeCheckpoint",
            display_name="SaRA Merge Checkpoint",
            category="sara",
            description="Write a new checkpoint = checkpoint + strength × each delta. Streams tensor by tensor, "
            "so memory stays near the largest tensor; the file appears only when complete.",
            inputs=inputs,
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ckpt_name: str, filename_prefix: str, **slots) -> io.NodeOutput:
        deltas, strengths = [], []
        for slot in range(1, DELTA_SLOTS + 1):
            name = slots.get(f"delta_{slot}", NONE)
            if name and name != NONE:
                deltas.append(folder_paths.get_full_path_or_raise("sara", name))
                strengths.append(float(slots[f"strength_{slot}"]))
        source = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        out = numbered_path(folder_paths.get_folder_paths("checkpoints")[0], filename_prefix)
        sara_train.merge_checkpoint(source, deltas, out, strengths)
        return io.NodeOutput(out)
