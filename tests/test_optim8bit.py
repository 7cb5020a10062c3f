"""8-bit Adam moments (bitsandbytes' AdamW8bit under SaRA): close to fp32 AdamW, carried through the
progressive step in new quantization blocks, and selectable in the trainer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bitsandbytes import functional as bnb_functional
from conftest import TinyNet
from diffusers import DDPMScheduler
from test_trainer_loop import interrupt_on_call, make_config, make_examples, train
from tiny_sd import tiny_unet
from torch import nn

import sara_train
from sara_train.engine.optim import SaRAOptimizer, sara_optimizer_class
from sara_train.engine.optim8bit import BLOCK
from sara_train.trainer.loop import run_training
from sara_train.trainer.state_file import read_state_file

STEPS = 12


def trained(moments: str, progressive_at: int | None = None) -> tuple[SaRAOptimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet()
    extra = {"min_8bit_size": 0} if moments == "8bit" else {}
    optimizer = sara_optimizer_class(moments)(
        model, lr=1e-2, budget=0.3, rank_weight=1e-3, progressive_at=progressive_at, **extra
    )
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=generator), torch.randn(8, 4, generator=generator)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    deltas = torch.cat([layer.values for layer in optimizer.handle.delta().layers.values()])
    return optimizer, deltas


def decoded_moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(
        bnb_functional.dequantize_blockwise(state[codes], absmax=state[scales], code=state[book], blocksize=BLOCK)
        for codes, scales, book in (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2"))
    )


def test_eight_bit_moments_train_like_fp32_moments() -> None:
    exact_optimizer, exact = trained("fp32")
    optimizer, deltas = trained("8bit")
    assert all(state["state1"].dtype == torch.uint8 for state in optimizer.state.values())
    assert all(state["state2"].dtype == torch.uint8 for state in optimizer.state.values())
    assert not torch.equal(deltas, exact)  # rounded moments: not the same numbers...
    error = (deltas - exact).norm() / exact.norm()
    assert error < 0.05, f"8-bit moments moved ΔP {error:.1%} away from fp32 AdamW"  # ...but the same training


def test_the_progressive_step_requantizes_the_kept_moments() -> None:
    optimizer, _ = trained("8bit")  # 12 steps, no progressive step yet
    old_params = list(optimizer.handle.parameters())
    before = {id(p): decoded_moments(optimizer.state[p]) for p in old_params}
    kept = {id(p): p.detach().abs() < optimizer.handle.threshold for p in old_params}
    optimizer.reselect()
    new_params = list(optimizer.handle.parameters())
    assert sum(p.numel() for p in new_params) < sum(p.numel() for p in old_params)
    for old, new in zip(old_params, new_params):
        state = optimizer.state[new]
        assert state["state1"].dtype == torch.uint8 and state["state1"].numel() == new.numel()
        assert state["absmax1"].numel() == -(-new.numel() // BLOCK)
        for moment, expected in zip(decoded_moments(state), before[id(old)]):
            expected = expected[kept[id(old)]]
            # encoded again in the new blocks: within 8-bit rounding of the sliced moments
            torch.testing.assert_close(moment, expected, rtol=0.05, atol=1e-3 * float(expected.abs().max()))


def test_trainer_runs_and_resumes_with_eight_bit_moments(tmp_path: Path) -> None:
    """``optimizer_moments="8bit"`` in the trainer: Ctrl-C after step 3 (of 8, across the progressive
    step), then ``--resume``, gives the uninterrupted run bit-identically."""
    config = make_config(tmp_path, optimizer_moments="8bit", progressive_fraction=0.5)
    expected, _ = train(replace(config, output_dir=str(tmp_path / "uninterrupted")))
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    interrupt_on_call(unet, 7)  # 2 micro-batches per step: the first of step 4
    first = run_training(unet, DDPMScheduler(num_train_timesteps=1000), make_examples(), config)
    assert first.interrupted and len(first.losses) == 3
    state, _ = read_state_file(Path(config.output_dir) / "state" / "training_state.safetensors")
    # layers with >= 4096 entries have 8-bit moments (bitsandbytes saves them under its own key)
    assert any("__bnb_optimizer_quant_state__" in entry for entry in state["optimizer"]["state"].values())
    resumed, _ = train(replace(config, resume=True))
    assert [row.loss for row in resumed.losses] == [row.loss for row in expected.losses]
    got, want = (sara_train.SparseDelta.load(result.delta_path) for result in (resumed, expected))
    for name, layer in want.layers.items():
        assert torch.equal(got.layers[name].values, layer.values), name


def test_unknown_moments_are_refused() -> None:
    with pytest.raises(sara_train.SaRAError, match="moments must be one of fp32, 8bit, got '4bit'"):
        sara_optimizer_class("4bit")
