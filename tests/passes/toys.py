"""Tiny models shared by the pass tests."""

from __future__ import annotations

import torch
from torch import nn


class Res(nn.Module):
    """A residual block ``x + fc(x)`` whose branch is scaled by ``scale`` (0: the identity)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)
