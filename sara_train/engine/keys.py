"""Matching a delta's weight keys to the keys of a model, state dict or checkpoint file."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import DeltaMismatchError


def resolve_keys(delta_keys: Iterable[str], target_keys: Iterable[str], target_name: str) -> dict[str, str]:
    """Map every delta key to a target key: exactly, or by adding or stripping one common prefix
    (``"diffusion_model.x"`` <-> ``"model.diffusion_model.x"``).

    The result does not depend on the order of either collection. Raises ``DeltaMismatchError``
    listing missing keys if no rule maps them all, and naming the candidates if more than one
    prefix would (e.g. a delta of one block that fits every block of the same shape).
    """
    delta_keys = sorted(delta_keys)
    targets = set(target_keys)
    if all(key in targets for key in delta_keys):
        return {key: key for key in delta_keys}
    probe = delta_keys[0]
    added = sorted({target[: -len(probe)] for target in targets if target.endswith("." + probe)})
    added = [prefix for prefix in added if all(prefix + key in targets for key in delta_keys)]
    cuts = [i + 1 for i, char in enumerate(probe) if char == "."]
    stripped = [
        probe[:cut] for cut in cuts if all(key.startswith(probe[:cut]) and key[cut:] in targets for key in delta_keys)
    ]
    if len(added) + len(stripped) == 1:
        if added:
            return {key: added[0] + key for key in delta_keys}
        cut = len(stripped[0])
        return {key: key[cut:] for key in delta_keys}
    if added or stripped:
        options = [f"adding {p!r}" for p in added] + [f"stripping {p!r}" for p in stripped]
        shown = ", ".join(options[:4]) + (f" and {len(options) - 4} more" if len(options) > 4 else "")
        raise DeltaMismatchError(
            f"the delta's {len(delta_keys)} keys fit {target_name} in {len(options)} places ({shown}): "
            f"it is ambiguous which layers it is for; rename its keys to the full names"
        )
    missing = [key for key in delta_keys if key not in targets]
    raise DeltaMismatchError(
        f"{len(missing)} of {len(delta_keys)} delta keys are not in {target_name} (e.g. {missing[:3]}); "
        f"the delta is for another model architecture or naming"
    )
