"""sara_train: SaRA (Progressive Sparse Low-Rank Adaptation) fine-tuning for any torch module.

    h = sara_train.inject(model, sara_train.SaRAConfig(budget=0.05))
    opt = torch.optim.AdamW(h.parameters(), lr=1e-4)
    loss = task_loss + rank_weight * h.rank_loss()
    h.reselect()                       # half way: progressive step
    h.delta().save("delta.safetensors")
"""
from .checkpoint import merge_checkpoint
from .config import SaRAConfig
from .delta import DeltaSummary, LayerDelta, SparseDelta
from .errors import DeltaFormatError, DeltaMismatchError, SaRAError
from .model import SaRAHandle, inject
from .optim import SaRAAdamW

__all__ = [
    "DeltaFormatError", "DeltaMismatchError", "DeltaSummary", "LayerDelta", "SaRAAdamW", "SaRAConfig",
    "SaRAError", "SaRAHandle", "SparseDelta", "inject", "merge_checkpoint",
]
__version__ = "0.1.0"
