"""A tiny teacher file for the elastic CLI test: a residual CNN on 8x8 inputs, random but fixed data."""

from __future__ import annotations

import torch

from tests.passes.elastic.conftest import TinyCNN, randomize_bn

G = torch.Generator().manual_seed(0)
X = torch.rand(64, 1, 8, 8, generator=G)
Y = torch.randint(0, 10, (64,), generator=G)


def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyCNN(c=16, hidden=16))


def example_inputs() -> tuple[torch.Tensor]:
    return (X[:1],)


def calib_data():
    return [X[i:i + 16] for i in range(0, 64, 16)]


def train_data():
    return [(X[i:i + 32], Y[i:i + 32]) for i in range(0, 64, 32)]
