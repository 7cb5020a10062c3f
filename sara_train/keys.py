"""Matching a delta's weight keys to the keys of a model, state dict or checkpoint file."""
from __future__ import annotations

from collections.abc import Iterable

from .errors import DeltaMismatchError


def resolve_keys(delta_keys: Iterable[str], target_keys: Iterable[str], target_name: str) -> dict[str, str]:
    """Map every delta key to a target key: exactly, or by adding or stripping one common prefix
    (``"diffusion_model.x"`` <-> ``"model.diffusion_model.x"``).

    Raises ``DeltaMismatchError`` listing missing keys if no single rule maps them all.
    """
    delta_keys = list(delta_keys)
    targets = set(target_keys)
    if all(key in targets for key in delta_keys):
        return {key: key for key in delta_keys}
    if not delta_keys:
        return {}
    probe = delta_keys[0]
    for target in targets:
        if target.endswith("." + probe):
            prefix = target[: -len(probe)]
            if all(prefix + key in targets for key in delta_keys):
                return {key: prefix + key for key in delta_keys}
    for cut in (i + 1 for i, char in enumerate(probe) if char == "."):
        prefix = probe[:cut]
        if probe[cut:] in targets and all(k.startswith(prefix) and k[cut:] in targets for k in delta_keys):
            return {key: key[cut:] for key in delta_keys}
    missing = [key for key in delta_keys if key not in targets]
    raise DeltaMismatchError(
        f"{len(missing)} of {len(delta_keys)} delta keys are not in {target_name} (e.g. {missing[:3]}); "
        f"the delta is for another model architecture or naming")
