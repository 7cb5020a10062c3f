"""SaRA Save: a SARA_DELTA (from SaRA Train) to ``models/sara/<prefix>_<NNNNN>_.safetensors``."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from sara_train import DTYPES

from .common import SARA_DELTA, numbered_path, sara_folder


class SaRASave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRASave",
            display_name="SaRA Save",
            category="sara",
            description="Save a trained SaRA delta to models/sara, with its training settings as metadata.",
            inputs=[
                SARA_DELTA.Input("delta"),
                io.String.Input(
                    "filename_prefix",
                    default="sara_delta",
                    tooltip="Saved as models/sara/<prefix>_<NNNNN>_.safetensors with the next free "
                    "number (ComfyUI's numbering: nothing is overwritten); may name a subfolder.",
                ),
                io.Combo.Input(
                    "values_dtype",
                    options=list(DTYPES),
                    default="fp16",
                    tooltip="Storage dtype of the values; indices are always int32.",
                ),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, delta, filename_prefix: str, values_dtype: str) -> io.NodeOutput:
        path = numbered_path(sara_folder(), filename_prefix)
        delta.save(path, dtype=DTYPES[values_dtype])
        text = (
            f"saved {os.path.basename(path)}: {delta.num_entries:,} entries, {os.path.getsize(path) / 2**20:.2f} MiB"
        )
        return io.NodeOutput(path, ui=ui.PreviewText(text))
