"""ComfyUI nodes for SaRA deltas: thin adapters between ComfyUI objects and ``sara_train``."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .export import SaRAExport
from .inspection import SaRAInspect
from .loader import SaRAApply, SaRALoader
from .merge import SaRAMergeCheckpoint, SaRAMergeDiffusionModel
from .save import SaRASave
from .train import SaRATrain

folder_paths.add_model_folder_path("sara", os.path.join(folder_paths.models_dir, "sara"))


class SaRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            SaRATrain,
            SaRASave,
            SaRALoader,
            SaRAApply,
            SaRAMergeCheckpoint,
            SaRAMergeDiffusionModel,
            SaRAExport,
            SaRAInspect,
        ]
