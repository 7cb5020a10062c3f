"""Saving and restoring a SaRA optimizer mid-training, for exact resumption (safetensors + JSON).

``training_state_tensors(optimizer)`` captures everything ``SaRAAdamW`` and its ``SaRAHandle`` hold
that a pretrained model does not: per layer the trainable entries (after any progressive
re-selection), their values and Adam moments, the frozen learned entries, and the counters.
``load_training_state(optimizer, tensors)`` puts it back into a freshly injected model of the same
base, after which training continues bit-identically. Keys are ``"<weight key>::<field>"`` and
``"::<counter>"``; nothing is pickled.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import SaRAError
from .optim import SaRAAdamW

LAYER_FIELDS = ("flat_indices", "base_values", "values", "frozen_indices", "frozen_delta", "frozen_base",
                "frozen_weight", "probe_values")
ADAM_FIELDS = ("step", "exp_avg", "exp_avg_sq")


@torch.no_grad()
def training_state_tensors(optimizer: SaRAAdamW) -> dict[str, torch.Tensor]:
    """All SaRA and AdamW state of ``optimizer`` as CPU tensors (call between steps)."""
    handle = optimizer.handle
    tensors: dict[str, torch.Tensor] = {}
    for name, update in handle.layers.items():
        fields = {
            "flat_indices": update.flat_indices, "base_values": update.base_values, "values": update.values,
            "frozen_indices": update.frozen_indices, "frozen_delta": update.frozen_delta,
            "frozen_base": update.frozen_base,
            "frozen_weight": handle.weight(name).reshape(-1)[update.frozen_indices.long()],
            "probe_values": update.probe_values,
        }
        for field, tensor in fields.items():
            tensors[f"{name}::{field}"] = tensor.detach().cpu().contiguous()
        for field, tensor in optimizer.state.get(update.values, {}).items():
            if field in ADAM_FIELDS:
                tensors[f"{name}::adam_{field}"] = torch.as_tensor(tensor).detach().cpu().contiguous()
    tensors["::steps_taken"] = torch.tensor(optimizer.steps_taken, dtype=torch.int64)
    tensors["::rank_cursor"] = torch.tensor(handle._rank_cursor, dtype=torch.int64)
    return tensors


@torch.no_grad()
def load_training_state(optimizer: SaRAAdamW, tensors: dict[str, torch.Tensor], where: str = "training state") -> None:
    """Restore ``training_state_tensors`` output into ``optimizer`` (freshly built on the same base).

    Raises ``SaRAError`` naming ``where`` if the layers, shapes or the base model's fingerprint
    differ. Mutates the model's weights (trained and frozen entries) and the optimizer.
    """
    handle = optimizer.handle
    saved_layers = {key.split("::")[0] for key in tensors if not key.startswith("::")}
    if saved_layers != set(handle.layers):
        missing, extra = set(handle.layers) - saved_layers, saved_layers - set(handle.layers)
        raise SaRAError(f"{where} does not match this model's SaRA layers: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(extra)[:3]}; it was saved for another model or other targets")
    if len(optimizer.param_groups) != 1:
        raise SaRAError("load_training_state expects a SaRAAdamW with one parameter group")
    new_params: list[nn.Parameter] = []
    for name, update in handle.layers.items():
        saved = {field: tensors[f"{name}::{field}"] for field in LAYER_FIELDS}
        device = update.flat_indices.device
        if not torch.equal(saved["probe_values"], update.probe_values.cpu()):
            raise SaRAError(f"{where}: layer {name!r} was trained on other base weights (fingerprint differs)")
        weight = handle.weight(name)
        flat_weight = weight.view(-1)
        update.restore_base_into(weight)
        update.flat_indices = saved["flat_indices"].to(device)
        update.base_values = saved["base_values"].to(device, weight.dtype)
        update.frozen_indices = saved["frozen_indices"].to(device)
        update.frozen_delta = saved["frozen_delta"].to(device)
        update.frozen_base = saved["frozen_base"].to(device, weight.dtype)
        flat_weight[update.frozen_indices.long()] = saved["frozen_weight"].to(device, weight.dtype)
        old_values = update.values
        update.values = nn.Parameter(saved["values"].to(device, old_values.dtype), requires_grad=old_values.requires_grad)
        update._synced_version = None
        update.write_values_into(weight)
        optimizer.state.pop(old_values, None)
        adam = {field: tensors[f"{name}::adam_{field}"] for field in ADAM_FIELDS if f"{name}::adam_{field}" in tensors}
        if adam:
            optimizer.state[update.values] = {
                "step": adam["step"].clone(),
                "exp_avg": adam["exp_avg"].to(device), "exp_avg_sq": adam["exp_avg_sq"].to(device)}
        new_params.append(update.values)
    optimizer.param_groups[0]["params"] = new_params
    optimizer.steps_taken = int(tensors["::steps_taken"])
    handle._rank_cursor = int(tensors["::rank_cursor"])
