"""Shared small models for the engine tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv2d -> GroupNorm -> Linear stack: exercises conv, norm and linear targets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        h = h.mean(dim=(2, 3))
        return self.head(torch.nn.functional.gelu(self.proj(h)))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 5, 5, generator=generator), torch.randn(6, 4, generator=generator)
