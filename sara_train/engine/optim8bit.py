"""``SaRAAdamW8bit``: ``SaRAOptimizer`` on bitsandbytes' AdamW8bit, whose two Adam moments are kept
8-bit block-wise quantized (blocks of 256 entries, one fp32 scale each): about 2 bytes per trainable
entry instead of 8. Not bit-identical to fp32 AdamW (the moments are rounded each step).

Imported only on request (``sara_optimizer_class("8bit")``): bitsandbytes is an optional dependency.
Values with fewer than ``min_8bit_size`` (bitsandbytes' default 4096) entries keep fp32 moments.
"""

from __future__ import annotations

import bitsandbytes
import torch
from bitsandbytes import functional as bnb_functional

from .optim import SaRAOptimizer

BLOCK = 256
"""bitsandbytes' block size for the block-wise 8-bit optimizer state."""

QUANTIZED = {"state1": ("absmax1", "qmap1", "dynamic"), "state2": ("absmax2", "qmap2", "udynamic")}
"""Per quantized moment (uint8 codes [k]): its block scales [ceil(k / BLOCK)], the state's key for
its code book [256], and that code book's name in bitsandbytes' ``name2qmap``."""

DECODED = "sara_decoded"
"""Marks, during the progressive step, a state whose moments were decoded to fp32."""


class SaRAAdamW8bit(SaRAOptimizer, bitsandbytes.optim.AdamW8bit):
    """SaRA's AdamW (see ``SaRAOptimizer``) with 8-bit moments.

    The progressive step slices each value tensor's moments; quantization blocks do not survive
    slicing, so the moments are decoded to fp32 for it and encoded again in the new blocks."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.handle.values_changed()  # bitsandbytes' kernels write the values behind autograd's back
        return loss

    @torch.no_grad()
    def reselect(self) -> None:
        for state in self.state.values():
            if state.get("state1") is None or state["state1"].dtype != torch.uint8:
                continue  # fp32 moments (fewer than min_8bit_size entries): sliced as they are
            for codes, (scales, code_book, _) in QUANTIZED.items():
                state[codes] = bnb_functional.dequantize_blockwise(
                    state[codes], absmax=state.pop(scales), code=state.pop(code_book), blocksize=BLOCK
                )
            state[DECODED] = True
        super().reselect()
        for state in self.state.values():
            if not state.pop(DECODED, False):
                continue
            for codes, (scales, code_book, name) in QUANTIZED.items():
                state[code_book] = self.name2qmap[name]
                state[codes], quantization = bnb_functional.quantize_blockwise(
                    state[codes].contiguous(), code=state[code_book], blocksize=BLOCK
                )
                state[scales] = quantization.absmax
