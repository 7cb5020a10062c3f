"""SaRA Inspect: the |w| histogram of a model with the thresholds for a few budgets."""

from __future__ import annotations

import comfy.model_management
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

import sara_train
from sara_train.engine.analysis import magnitude_histogram, parse_budgets, threshold_for_budget
from sara_train.engine.selection import find_targets
from sara_train.plots.histogram import draw_histogram

from .common import NONE


class SaRAInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaRAInspect",
            display_name="SaRA Inspect",
            category="sara",
            description="Histogram of the weight magnitudes SaRA chooses from, with the threshold each budget "
            "gives, and a text summary (plus a delta file's contents if one is chosen).",
            inputs=[
                io.Model.Input("model"),
                io.String.Input(
                    "budgets",
                    default="0.01, 0.05, 0.1",
                    tooltip="Fractions of the targeted weights to train, comma-separated.",
                ),
                io.Combo.Input("delta_name", options=[NONE, *folder_paths.get_filename_list("sara")], default=NONE),
            ],
            outputs=[io.Image.Output(display_name="histogram"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, budgets: str, delta_name: str) -> io.NodeOutput:
        fractions = parse_budgets(budgets)
        # The module may still hold another clone's patches (e.g. a SaRA Load sampled just before):
        # loading this model makes ComfyUI put its own weights back, so the base is what is measured.
        comfy.model_management.load_models_gpu([model])
        targets = find_targets(model.model.diffusion_model, sara_train.SaRAConfig())
        weights = [getattr(t.module, t.param_name) for t in targets]
        thresholds = {f"{b:.1%}": threshold_for_budget(weights, b) for b in fractions}
        edges, counts = magnitude_histogram(weights)
        image = np.asarray(draw_histogram(edges, counts, thresholds), dtype=np.float32) / 255.0
        lines = [
            f"model: {type(model.model.model_config).__name__}, weights stored as {weights[0].dtype}",
            f"targeted weights: {len(weights)} tensors, {sum(w.numel() for w in weights):,} entries",
        ]
        lines += [f"budget {label} -> threshold {value:.6g}" for label, value in thresholds.items()]
        if delta_name != NONE:
            delta = sara_train.SparseDelta.load(folder_paths.get_full_path_or_raise("sara", delta_name))
            lines.append(str(delta.summary()).splitlines()[0])
        return io.NodeOutput(torch.from_numpy(image)[None], "\n".join(lines))
