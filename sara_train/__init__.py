"""sara_train: SaRA (Progressive Sparse Low-Rank Adaptation) fine-tuning for any torch module.

    h = sara_train.inject(model, sara_train.SaRAConfig(budget=0.05))
    opt = torch.optim.AdamW(h.parameters(), lr=1e-4)
    loss = task_loss + rank_weight * h.rank_loss()
    h.reselect()                       # half way: progressive step
    h.delta().save("delta.safetensors")

The package is layered, imports pointing one way:

    engine/    torch + safetensors only: selection, the sparse weight, rank loss, handle, optimizer,
               the delta format, fitting deltas to targets, the streaming merge
    families/  model-family knowledge: key namings and checkpoint layouts (registered with the
               engine's delta path on import, so a delta fits a model whatever naming either uses)
    export/    files other tools load (webui "full" differences, SVD LoRAs); engine and families only
    plots/, trainer/, cli/, demo/   applications: images, the diffusers trainer, `sara-train`, `make demo`

``import sara_train`` needs neither diffusers nor transformers (only the trainer and demo do).
"""

from . import families  # noqa: F401  (registers the model families' key namings with engine.apply)
from .engine import (
    DTYPES,
    DeltaFormatError,
    DeltaMismatchError,
    DeltaSummary,
    LayerDelta,
    RestorePoint,
    SaRAAdamW,
    SaRAConfig,
    SaRAError,
    SaRAHandle,
    SaRAOptimizer,
    SparseDelta,
    SparseEMA,
    apply_delta,
    fit_delta,
    inject,
    merge_checkpoint,
    sara_optimizer_class,
)

__all__ = [
    "DTYPES",
    "DeltaFormatError",
    "DeltaMismatchError",
    "DeltaSummary",
    "LayerDelta",
    "RestorePoint",
    "SaRAAdamW",
    "SaRAConfig",
    "SaRAOptimizer",
    "SaRAError",
    "SaRAHandle",
    "SparseDelta",
    "SparseEMA",
    "apply_delta",
    "fit_delta",
    "inject",
    "merge_checkpoint",
    "sara_optimizer_class",
]
__version__ = "0.2.0"
