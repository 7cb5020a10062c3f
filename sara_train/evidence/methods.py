"""The fine-tuning methods compared, each made trainable on a UNet at an equal trainable budget.

``budget`` is a fraction of the entries SaRA targets (every Linear and Conv weight). SaRA and its
ablations use the engine (``SaRAAdamW``); LoRA and Super-Tuning are peft's (``pip install peft``,
the ``bench`` extra); full fine-tuning trains every parameter with AdamW. ``sara_8bit`` needs
bitsandbytes (the ``lowmem`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.config import SaRAConfig
from ..engine.optim import sara_optimizer_class
from ..engine.selection import budget_to_count, find_targets
from ..families.sd_unet import full_resolution_modules

RANK_WEIGHT = 1e-4
"""The nuclear-norm weight of the SaRA variants that use it (the demo's and CLI's default)."""
RANK_LAYERS_PER_STEP = 8


@dataclass(frozen=True)
class Method:
    """One way to fine-tune. ``kind`` is "sara", "lora", "supertuning" or "full"; for "sara",
    ``selection`` (see ``SaRAConfig.selection``), ``rank_loss`` and ``progressive`` say which parts
    of SaRA are on, ``moments`` how Adam keeps its moments (``MOMENTS``) and ``low_resolution_only``
    whether the full-resolution layers are left out (the same trainable count goes to the others).
    ``label`` names it in tables."""

    name: str
    label: str
    kind: str
    selection: str = "smallest"
    rank_loss: bool = False
    progressive: bool = False
    moments: str = "fp32"
    low_resolution_only: bool = False

    @property
    def budgeted(self) -> bool:
        return self.kind != "full"


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("sara", "SaRA", "sara", rank_loss=True, progressive=True),
        Method("lora", "LoRA (peft)", "lora"),
        Method("supertuning", "Super-Tuning (peft)", "supertuning"),
        Method("full", "full fine-tuning", "full"),
        Method("sara_no_progressive", "SaRA w/o progressive step", "sara", rank_loss=True),
        Method("sara_no_rank", "SaRA w/o rank loss", "sara", progressive=True),
        Method("sara_neither", "SaRA w/o both (smallest-magnitude only)", "sara"),
        Method("largest", "largest-magnitude entries (+ rank loss)", "sara", selection="largest", rank_loss=True),
        Method("random", "random entries (+ rank loss)", "sara", selection="random", rank_loss=True),
        Method("sara_8bit", "SaRA, 8-bit Adam moments", "sara", rank_loss=True, progressive=True, moments="8bit"),
        Method(
            "sara_low_res",
            "SaRA without the full-resolution layers",
            "sara",
            rank_loss=True,
            progressive=True,
            low_resolution_only=True,
        ),
    )
}
"""Every method, by name. ``largest`` and ``random`` keep the rank loss but have no progressive
step (re-selection keeps entries below a threshold; those selections have none)."""


def targeted_entries(unet: nn.Module) -> int:
    """Entries of the weights SaRA targets by default: the denominator of every budget."""
    return sum(getattr(t.module, t.param_name).numel() for t in find_targets(unet, SaRAConfig()))


def lora_rank_for(unet: nn.Module, count: int) -> int:
    """The LoRA rank whose adapters on every Linear and Conv2d hold closest to ``count`` parameters
    (at least 1)."""
    per_rank = 0
    for module in unet.modules():
        if isinstance(module, nn.Linear):
            per_rank += module.in_features + module.out_features
        elif isinstance(module, nn.Conv2d):
            per_rank += module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels
    return max(1, round(count / per_rank))


def make_trainable(
    method: Method, unet: nn.Module, budget: float, learning_rate: float, steps: int, seed: int
) -> tuple[torch.optim.Optimizer, int]:
    """Prepare ``unet`` (in place) for ``method`` and return ``(optimizer, trainable entries)``.

    ``budget`` is ignored for full fine-tuning. The SaRA variants take their progressive step after
    ``steps // 2`` optimizer steps; a random selection is seeded with ``seed``. Weight decay is 0
    for every method.
    """
    count = budget_to_count(budget, targeted_entries(unet))
    if method.kind == "full":
        unet.requires_grad_(True)
        parameters = list(unet.parameters())
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0), sum(p.numel() for p in parameters)
    if method.kind == "sara":
        exclude = full_resolution_modules(unet.config) if method.low_resolution_only else []
        quantize_all = {"min_8bit_size": 0} if method.moments == "8bit" else {}  # the small layers' moments too
        optimizer = sara_optimizer_class(method.moments)(
            unet,
            lr=learning_rate,
            config=SaRAConfig(budget=count, selection=method.selection, selection_seed=seed, exclude=exclude),
            rank_weight=RANK_WEIGHT if method.rank_loss else 0.0,
            rank_layers_per_step=RANK_LAYERS_PER_STEP,
            progressive_at=max(1, steps // 2) if method.progressive else None,
            **quantize_all,
        )
        return optimizer, optimizer.handle.num_trainable
    from peft import LoraConfig, SupertuningConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    if method.kind == "lora":
        names = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
        rank = lora_rank_for(unet, count)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names)
    elif method.kind == "supertuning":
        names = [name for name, module in unet.named_modules() if isinstance(module, nn.Linear)]
        linear_entries = sum(unet.get_submodule(name).weight.numel() for name in names)
        config = SupertuningConfig(
            target_modules=names, sparsity=1 - min(1.0, count / linear_entries), select_top=False
        )
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    inject_adapter_in_model(config, unet)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0), sum(p.numel() for p in parameters)
