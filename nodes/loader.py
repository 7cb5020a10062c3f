"""SaRA Load and SaRA Apply: a delta (a file in ``models/sara``, or a SARA_DELTA) onto a MODEL at a strength."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

import sara_train

from .adapter import patch_model
from .common import SARA_DELTA

STRENGTH_TOOLTIP = "1 applies the delta as trained, 0 leaves the model unchanged, -1 removes it."


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
                io.Combo.Input(
                    "delta_name",
                    options=folder_paths.get_filename_list("sara"),
                    tooltip="A .safetensors delta in models/sara.",
                ),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, delta_name: str, strength: float) -> io.NodeOutput:
        delta = sara_train.SparseDelta.load(folder_paths.get_full_path_or_raise("sara", delta_name))
        return io.NodeOutput(patch_model(model, delta, strength))


class SaRAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRAApply",
            display_name="SaRA Apply",
            category="sara",
            description="Add a SARA_DELTA (e.g. straight from SaRA Train, no file) to a model at a strength.",
            inputs=[
                io.Model.Input("model"),
                SARA_DELTA.Input("delta"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, delta: sara_train.SparseDelta, strength: float) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, delta, strength))
