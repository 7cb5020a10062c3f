"""SaRAConfig: which weights SaRA trains and how they are selected."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SaRAError

DEFAULT_BUDGET = 0.05
SELECTIONS = ("smallest", "largest", "random")
WEIGHT_GRADIENTS = ("auto", "dense")
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.RMSNorm,
)


@dataclass
class SaRAConfig:
    """Hyperparameters of the sparse selection.

    Exactly one of ``threshold`` and ``budget`` may be set; with neither, ``budget=0.05``.
    """

    threshold: float | None = None
    """Train the entries with ``|w| < threshold`` (an absolute magnitude)."""
    budget: float | int | None = None
    """Train the smallest-magnitude entries: a float in (0, 1] is a fraction of all targeted
    entries, an int >= 1 a count. Solved exactly (global k-th smallest |w|)."""
    selection: str = "smallest"
    """Which entries a budget picks: ``"smallest"`` |w| (SaRA), or for ablations ``"largest"`` |w| or
    ``"random"`` (uniform over all targeted entries, seeded by ``selection_seed``; needs 4 bytes per
    targeted entry while selecting). Only ``"smallest"`` has a threshold, so only it takes a
    ``threshold`` and allows the progressive re-selection."""
    selection_seed: int = 0
    """Seed of a ``"random"`` selection (same seed, same targets: same entries)."""
    target_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    """Module types whose ``weight`` is targeted."""
    include: list[str] = field(default_factory=list)
    """Regexes (``re.search``) on module names; if given, only matching modules are targeted."""
    exclude: list[str] = field(default_factory=list)
    """Regexes on module names; matching modules are never targeted."""
    include_bias: bool = False
    """Also target the ``bias`` of targeted modules."""
    include_norm: bool = False
    """Also target ``weight`` and ``bias`` of normalisation layers (LayerNorm, GroupNorm, ...)."""
    values_dtype: torch.dtype = torch.float32
    """Dtype of the trainable values (fp32 masters by default, whatever the weights' dtype)."""
    probe_size: int = 4
    """Largest-|w| entries per weight recorded as the base fingerprint of a delta."""
    overlay_dtype: torch.dtype | None = None
    """None: trained values are written into the stored weights (exact for fp32, fp32-master mixed
    precision for bf16/fp16). A dtype: the stored weights are never written; each forward uses a
    copy in this dtype with the trained values in place (for weights stored in fp8, or whenever the
    update must not be rounded to the storage dtype). See ``sara_train.engine.sparse``."""
    weight_gradient: str = "auto"
    """How the selected entries' gradient is formed. ``"dense"``: each layer's usual weight gradient,
    gathered (bit-identical to dense training masked to the entries). ``"auto"``: on a CPU, Linear
    and Conv2d layers choose per call between that and a sampled product at the entries only,
    whichever is faster for the shapes (``sara_train.engine.layer_gradient``; equal to fp32 rounding).
    Elsewhere (a GPU) ``"auto"`` is ``"dense"``."""
    base_device: str | None = None
    """None: the pretrained values of the trained entries stay with the model. A device (``"cpu"``):
    they are kept there, off the compute device (4 bytes per entry for fp32 weights, 2 for bf16),
    and read only to form ΔP (rank loss, EMA, weight decay, export) and to restore the weights."""

    def __post_init__(self) -> None:
        if self.threshold is not None and self.budget is not None:
            raise SaRAError("SaRAConfig: give either threshold or budget, not both")
        if self.threshold is None and self.budget is None:
            self.budget = DEFAULT_BUDGET
        if self.selection not in SELECTIONS:
            raise SaRAError(f"SaRAConfig: selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection != "smallest" and self.threshold is not None:
            raise SaRAError(f"SaRAConfig: a {self.selection!r} selection takes a budget, not a threshold")
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0
        ):
            raise SaRAError(f"SaRAConfig: threshold must be a finite number > 0, got {self.threshold!r}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise SaRAError(f"SaRAConfig: budget must be a number, got {self.budget!r}")
            if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:  # also refuses NaN
                raise SaRAError(f"SaRAConfig: a fractional budget must be in (0, 1], got {self.budget}")
            if isinstance(self.budget, int) and self.budget < 1:
                raise SaRAError(f"SaRAConfig: a count budget must be >= 1, got {self.budget}")
        if self.overlay_dtype is not None and self.overlay_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SaRAError(
                f"SaRAConfig: overlay_dtype must be float32, bfloat16 or float16, got {self.overlay_dtype}"
            )
        if not self.values_dtype.is_floating_point:
            raise SaRAError(f"SaRAConfig: values_dtype must be a float dtype, got {self.values_dtype}")
        if self.weight_gradient not in WEIGHT_GRADIENTS:
            raise SaRAError(
                f"SaRAConfig: weight_gradient must be one of {WEIGHT_GRADIENTS}, got {self.weight_gradient!r}"
            )
        if self.base_device is not None:
            try:
                torch.device(self.base_device)
            except (RuntimeError, TypeError) as error:
                raise SaRAError(f"SaRAConfig: base_device {self.base_device!r} is not a device ({error})") from None
        if self.probe_size < 1:
            raise SaRAError(f"SaRAConfig: probe_size must be >= 1, got {self.probe_size}")
        for option in ("include", "exclude"):
            for pattern in getattr(self, option):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise SaRAError(
                        f"SaRAConfig: {option} pattern {pattern!r} is not a valid regex ({error})"
                    ) from None
