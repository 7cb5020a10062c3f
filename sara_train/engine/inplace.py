"""Training code written for inference: augmented assignments on activations, made out of place.

Inference code often updates activations in place (``img += gate * attn(img)`` in ComfyUI's Flux
blocks). Under autograd that fails ("a variable needed for gradient computation has been modified
by an inplace operation") when the tensor was saved for backward. Inside
``out_of_place_augmented_assignments()``, an augmented assignment (``x += y``, ``-=``, ``*=``,
``/=``) with grad enabled and either operand requiring grad computes a new tensor instead; Python
then binds the name to it, so the code means what it meant. Either operand: when ``x`` does not
require grad but ``y`` does (a block whose input comes from frozen layers), an in-place add would
make ``x`` part of the graph and change it for everyone holding it, e.g. gradient checkpointing,
which recomputes the block from that same input. Explicit in-place calls (``x.add_(y)``, whose
result may be ignored) and updates outside the autograd graph are left alone: which of the two a
``+=`` is is read from the calling frame's current instruction.
"""

from __future__ import annotations

import dis
import functools
import sys
from types import CodeType, FrameType

import torch
from torch.overrides import TorchFunctionMode

OUT_OF_PLACE = {"add_": torch.Tensor.add, "sub_": torch.Tensor.sub, "mul_": torch.Tensor.mul, "div_": torch.Tensor.div}
"""In-place tensor methods Python's augmented assignment dispatches to, and their out-of-place forms."""


@functools.lru_cache(maxsize=4096)
def _augmented_assignment_offsets(code: CodeType) -> frozenset[int]:
    """Byte offsets of the augmented-assignment instructions in ``code`` (``BINARY_OP`` with an
    in-place operator on Python 3.11+, ``INPLACE_*`` before)."""
    return frozenset(
        instruction.offset
        for instruction in dis.get_instructions(code)
        if instruction.opname.startswith("INPLACE_")
        or (instruction.opname == "BINARY_OP" and instruction.argrepr.endswith("=") and instruction.argrepr != "=")
    )


def _is_augmented_assignment(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_lasti in _augmented_assignment_offsets(frame.f_code)


class _OutOfPlaceAugmentedAssignments(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = OUT_OF_PLACE.get(getattr(func, "__name__", ""))
        if (
            out_of_place is not None
            and torch.is_grad_enabled()
            and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)
            and _is_augmented_assignment(sys._getframe(1))
        ):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


def out_of_place_augmented_assignments() -> TorchFunctionMode:
    """A context manager (a ``TorchFunctionMode``) under which ``x += y`` and its kin in the autograd
    graph compute a new tensor; see the module docstring."""
    return _OutOfPlaceAugmentedAssignments()
