"""Exports of a delta for tools that do not read the sparse format: the LoRA-folder loaders of the
webuis and ComfyUI.

    layers.py  the loaders' layer names (``lora_unet_<module path>``), in the original or diffusers naming
    diff.py    exact: the LyCORIS "full" format (a dense difference per touched layer)
    lora.py    approximate: a rank-R LoRA per layer by SVD, with its measured error and a limit
"""

from .diff import ExportReport, export_webui_diff
from .lora import DEFAULT_MAX_ERROR, LoRAExport, export_lora, lora_factors

__all__ = ["DEFAULT_MAX_ERROR", "ExportReport", "LoRAExport", "export_lora", "export_webui_diff", "lora_factors"]
