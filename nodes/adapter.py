"""Applying a SparseDelta to a ComfyUI model through its own patch machinery.

``SaRAWeightAdapter`` is a ``comfy.weight_adapter.WeightAdapterBase``: ``ModelPatcher`` calls its
``calculate_weight`` when it patches a weight (full load, lowvram per forward, CheckpointSave), and
it adds ``strength * values`` at the stored indices. Only the indices and values stay in memory.
"""
from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterBase

import sara_train
from sara_train.delta import LayerDelta, add_sparse_, check_layer_fits, check_strength
from sara_train.keys import resolve_keys


class SaRAWeightAdapter(WeightAdapterBase):
    """One weight's sparse update: ``weights = [flat_indices int32 [k], values [k]]``."""

    name = "sara"

    def __init__(self, loaded_keys: set[str], weights: list[torch.Tensor]) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        flat_indices, values = self.weights
        add_sparse_(weight, LayerDelta(tuple(weight.shape), flat_indices, values), strength)
        return weight


def patch_model(model, delta: sara_train.SparseDelta, strength: float, check_base: bool = True):
    """A clone of ComfyUI ``model`` (a ModelPatcher) with ``delta`` added at ``strength``.

    Delta keys are matched to the model's state-dict keys (``diffusion_model.*``) directly or via
    one prefix; the strength (finite) and keys, shapes and base weights are checked first
    (``SaRAError`` / ``DeltaMismatchError``), so a bad input leaves ``model`` untouched.
    """
    strength = check_strength(strength)
    patcher = model.clone()
    state = patcher.model.state_dict()
    mapping = resolve_keys(delta.layers, state, "the model")
    for key, model_key in mapping.items():
        check_layer_fits(key, delta.layers[key], state[model_key], check_base)
    patches = {model_key: SaRAWeightAdapter({key}, [delta.layers[key].flat_indices, delta.layers[key].values])
               for key, model_key in mapping.items()}
    patcher.add_patches(patches, strength)
    return patcher
