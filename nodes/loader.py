"""SaRA Load: a delta file from ``models/sara`` onto a MODEL at a strength."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

import sara_train

from .adapter import patch_model


class SaRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRALoader",
            display_name="SaRA Load",
            category="sara",
            description="Add a SaRA delta (models/sara) to a model. It is merged into the weights when the "
                        "model loads, so sampling is exactly as fast as with the base model.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("delta_name", options=folder_paths.get_filename_list("sara"),
                               tooltip="A .safetensors delta in models/sara."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="1 applies the delta as trained, 0 leaves the model unchanged, -1 removes it."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, delta_name: str, strength: float) -> io.NodeOutput:
        delta = sara_train.SparseDelta.load(folder_paths.get_full_path_or_raise("sara", delta_name))
        return io.NodeOutput(patch_model(model, delta, strength))
