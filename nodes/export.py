"""SaRA Export: a delta from models/sara as a file ComfyUI's LoraLoader and the webuis read, written
to models/loras: exact (LyCORIS "full" difference) or an approximate rank-R LoRA with its error."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

import sara_train
from sara_train import DTYPES
from sara_train.export import DEFAULT_MAX_ERROR, export_lora, export_webui_diff
from sara_train.export.layers import NAMINGS

from .common import numbered_path

AS_DELTA = "as delta"


class SaRAExport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRAExport",
            display_name="SaRA Export",
            category="sara",
            description="Write a SaRA delta to models/loras in a format LoRA loaders read: webui-diff is exact "
            "(ComfyUI's Load LoRA, A1111, Forge, reForge; about the model's size), lora is a rank-R "
            "approximation whose error is reported (refused above max_error).",
            inputs=[
                io.Combo.Input(
                    "delta_name", options=folder_paths.get_filename_list("sara"), tooltip="A delta in models/sara."
                ),
                io.Combo.Input("format", options=["webui-diff", "lora"], default="webui-diff"),
                io.Combo.Input(
                    "naming",
                    options=list(NAMINGS),
                    default="ldm",
                    tooltip="ldm: ComfyUI, A1111, Forge, reForge. diffusers: SD.Next (SD1/SD2/SDXL; connect the "
                    "model so the names can be translated).",
                ),
                io.Combo.Input("values_dtype", options=[AS_DELTA, *DTYPES], default=AS_DELTA),
                io.Int.Input("rank", default=32, min=1, max=4096, tooltip="LoRA rank (format lora)."),
                io.Float.Input(
                    "max_error",
                    default=DEFAULT_MAX_ERROR,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Largest overall relative Frobenius error a LoRA may have (format lora).",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="sara_export",
                    tooltip="Saved as models/loras/<prefix>_<NNNNN>_.safetensors with the next free number.",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The base model: only needed to translate names (naming diffusers).",
                ),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        delta_name: str,
        format: str,
        naming: str,
        values_dtype: str,
        rank: int,
        max_error: float,
        filename_prefix: str,
        model=None,
    ) -> io.NodeOutput:
        source = folder_paths.get_full_path_or_raise("sara", delta_name)
        delta = sara_train.SparseDelta.load(source)
        base = None
        if model is not None:
            base = {key: tuple(tensor.shape) for key, tensor in model.model.state_dict().items()}
        out = numbered_path(folder_paths.get_folder_paths("loras")[0], filename_prefix)
        options = {"naming": naming, "dtype": DTYPES.get(values_dtype), "base": base}
        if format == "webui-diff":
            text = str(export_webui_diff(delta, out, **options))
        else:
            text = export_lora(delta, out, rank, max_error, **options).table()
        sparse = os.path.getsize(source) / 2**20
        text += f"\n{os.path.basename(out)}: {os.path.getsize(out) / 2**20:.2f} MiB; {delta_name}: {sparse:.2f} MiB"
        return io.NodeOutput(out, ui=ui.PreviewText(text))
