"""SaRA Save: a SARA_DELTA (from SaRA Train) to ``models/sara/<name>.safetensors``."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from .folders import plain_file_name, sara_folder
from .train import SARA_DELTA

VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
                io.String.Input("filename", default="sara_delta",
                                tooltip="File name in models/sara (.safetensors is added)."),
                io.Combo.Input("values_dtype", options=list(VALUE_DTYPES), default="fp16",
                               tooltip="Storage dtype of the values; indices are always int32."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name; otherwise _001, _002, ... is added."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, delta, filename: str, values_dtype: str, overwrite: bool) -> io.NodeOutput:
        stem = filename.removesuffix(".safetensors")
        plain_file_name(stem, "filename")
        folder = sara_folder()
        path = os.path.join(folder, f"{stem}.safetensors")
        counter = 0
        while os.path.exists(path) and not overwrite:
            counter += 1
            path = os.path.join(folder, f"{stem}_{counter:03d}.safetensors")
        delta.save(path, dtype=VALUE_DTYPES[values_dtype])
        text = f"saved {os.path.basename(path)}: {delta.num_entries:,} entries, {os.path.getsize(path) / 2**20:.2f} MiB"
        return io.NodeOutput(path, ui=ui.PreviewText(text))
