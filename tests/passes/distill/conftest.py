"""Shared fixtures: tiny seeded models and data so the distillation tests stay fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def mlp(d_in: int, hidden: int, d_out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@pytest.fixture
def teacher_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A sharp teacher on 8-D inputs (5 classes) and 512 inputs labelled by it."""
    teacher = mlp(8, 64, 5, seed=0)
    with torch.no_grad():
        teacher[2].weight.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return teacher.eval(), x, y
