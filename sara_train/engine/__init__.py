"""The SaRA engine: torch + safetensors only (bitsandbytes for the optional 8-bit moments), for any
``torch.nn.Module``.

config.py     SaRAConfig: which weights train, threshold or budget
selection.py  targets and the exact budget -> sorted int32 flat indices
sparse.py     SparseUpdate: the sparse-trainable weight (parametrization + autograd function)
rank_loss.py  the nuclear-norm loss and its gradient at the trainable entries
handle.py     inject() and SaRAHandle: parameters, rank loss, re-selection, delta, remove
optim.py      SaRAAdamW, the one-line form (decay of ΔP toward the pretrained weights); 8-bit moments
optim8bit.py  SaRAAdamW8bit (bitsandbytes, imported on request)
positions.py  the trained entries' positions, row-compressed (~2 bytes each)
ema.py        SparseEMA: a moving average of ΔP on the selected entries only
delta.py      SparseDelta: the file format, stack, scale, summary
apply.py      the one delta path: fit a delta to any target's names, check it, add it
checkpoint.py the streaming merge into .safetensors checkpoints
analysis.py   |w| histograms, budget -> threshold, the paper's Sec. 3.1 zeroing check
files.py      safetensors header validation, atomic writes, output checks
keys.py       matching key names exactly or through one prefix
"""

from .apply import KeyNaming, Piece, RestorePoint, apply_delta, fit_delta, register_naming
from .checkpoint import merge_checkpoint
from .config import SaRAConfig
from .delta import DTYPES, DeltaSummary, LayerDelta, SparseDelta
from .ema import SparseEMA
from .errors import DeltaFormatError, DeltaMismatchError, SaRAError
from .handle import SaRAHandle, inject
from .optim import SaRAAdamW, SaRAOptimizer, sara_optimizer_class

__all__ = [
    "DTYPES",
    "DeltaFormatError",
    "DeltaMismatchError",
    "DeltaSummary",
    "KeyNaming",
    "LayerDelta",
    "Piece",
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
    "register_naming",
]
