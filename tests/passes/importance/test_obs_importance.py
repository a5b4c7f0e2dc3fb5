"""OBS importance equals the brute-force least-squares error of dropping each unit."""

from __future__ import annotations

import numpy as np
import torch
from potstill.inputs.data import Batch
from potstill.ir.capture import analyze
from potstill.passes.importance import get_estimator
from potstill.passes.importance.obs import OBSImportance
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_obs_matches_brute_force_refit():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(200, 3)
    a = analyze(model, (x,))
    (g,) = [g for g in a.prunable() if g.n_units == 6]
    got = OBSImportance(ridge=1e-12).scores(model, a, [Batch((x,))])[g.id]
    with torch.no_grad():
        h = torch.relu(model.fc1(x)).double().numpy()
    h1 = np.concatenate([h, np.ones((len(h), 1))], 1)
    y = h1 @ np.concatenate([model.fc2.weight.detach().double().numpy(), model.fc2.bias.detach().double().numpy()[:, None]], 1).T
    expected = []
    for u in range(6):
        cols = [c for c in range(7) if c != u]
        coef, *_ = np.linalg.lstsq(h1[:, cols], y, rcond=None)
        expected.append(((h1[:, cols] @ coef - y) ** 2).sum())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    assert get_estimator("obs").name == "obs"
