"""Applying a SparseDelta to a ComfyUI model through its own patch machinery.

``SaRAWeightAdapter`` is a ``comfy.weight_adapter.WeightAdapterBase``: ``ModelPatcher`` calls its
``calculate_weight`` when it patches a weight (full load, lowvram per forward, CheckpointSave), and
it adds ``strength * values`` at the stored indices. Only the indices and values stay in memory.
"""

from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterBase

import sara_train
from sara_train.engine.apply import add_sparse_, fit_to_tensors
from sara_train.engine.delta import LayerDelta, check_strength


class SaRAWeightAdapter(WeightAdapterBase):
    """One weight's sparse update: ``weights = [flat_indices int32 [k], values [k]]``."""

    name = "sara"

    def __init__(self, loaded_keys: set[str], weights: list[torch.Tensor]) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        """``weight`` with ``strength * values`` added at the indices (in fp32, rounded once), in
        place; ``function`` (ComfyUI's hook for patch-specific transforms) is applied to the
        update first, as ComfyUI's LoRA adapter does."""
        flat_indices, values = self.weights
        if function is not None:
            values = function(values.to(intermediate_dtype))
        add_sparse_(weight, LayerDelta(tuple(weight.shape), flat_indices, values), strength)
        return weight


def patch_model(model, delta: sara_train.SparseDelta, strength: float, check_base: bool = True):
    """A clone of ComfyUI ``model`` (a ModelPatcher) with ``delta`` added at ``strength``.

    The delta is fitted to the model's state-dict keys (``diffusion_model.*``) through the library's
    one delta path (any key naming a model family knows), and the strength (finite), shapes and
    base weights are checked against the unpatched weights first (``SaRAError`` /
    ``DeltaMismatchError``), so a bad input leaves ``model`` untouched.

    The weights a clone currently has patched in place are read from the backups clones share:
    ComfyUI rounds patched fp8 weights stochastically, which can move an entry no patch touches by
    one fp8 step, so the patched values would fail the base check of a delta trained on the base.
    """
    strength = check_strength(strength)
    patcher = model.clone()
    unpatched = patcher.model.state_dict()
    unpatched.update({key: backup.weight for key, backup in patcher.backup.items() if key in unpatched})
    fitted = fit_to_tensors(delta, unpatched, check_base, "the model")
    patches = {
        key: SaRAWeightAdapter({key}, [layer.flat_indices, layer.values]) for key, layer in fitted.layers.items()
    }
    patcher.add_patches(patches, strength)
    return patcher
