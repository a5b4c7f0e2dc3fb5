"""Each width estimator against a hand-computed example on a two-layer MLP.

MLP: x[B,T,3] -> fc1 (3->4) -> ReLU -> fc2 (4->2). The 4 hidden neurons form one coupled group
with members fc1.weight (dim 0, out), fc1.bias (dim 0, out), fc2.weight (dim 1, in).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from potstill.inputs.data import Batch
from potstill.ir.capture import analyze
from potstill.passes.importance import get_estimator
from potstill.passes.importance.activation import ActivationImportance
from potstill.passes.importance.base import aggregate, calibration_batches
from potstill.passes.importance.fisher import FisherImportance
from potstill.passes.importance.magnitude import MagnitudeImportance
from potstill.passes.importance.taylor import TaylorImportance
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp() -> tuple[MLP, object, torch.Tensor]:
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.1, 0.1], [-3.0, 0.0, 1.0], [0.5, 0.5, -0.5]]))
        model.fc1.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
        model.fc2.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 2.0, 1.0]]))
    x = torch.randn(2, 5, 3)
    a = analyze(model, (x,))
    return model, a, x


def hidden_group(a):
    (g,) = [g for g in a.prunable() if g.n_units == 4]
    return g


def test_magnitude_l2_and_l1_by_hand(mlp):
    model, a, _ = mlp
    g = hidden_group(a)
    w1, b1, w2 = (p.detach().double().numpy() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight))
    for p in (1, 2):
        norm = (lambda v, p=p: np.abs(v).sum(axis=1)) if p == 1 else (lambda v: np.sqrt((v**2).sum(axis=1)))
        members = [norm(w1), np.abs(b1), norm(w2.T)]
        expected = sum(m / m.mean() for m in members)
        got = MagnitudeImportance(p=p).scores(model, a)[g.id]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # raw sums without normalisation
    got = MagnitudeImportance(p=2, normalize=False).scores(model, a)[g.id]
    np.testing.assert_allclose(got, np.sqrt((w1**2).sum(1)) + np.abs(b1) + np.sqrt((w2**2).sum(0)), rtol=1e-6)


def _grads_by_hand(model: MLP, x: torch.Tensor, t: torch.Tensor):
    """Analytic gradients of L = mean((y - t)^2) for the MLP (numpy)."""
    w1, b1, w2 = (p.detach().double().numpy() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight))
    xs = x.double().numpy().reshape(-1, 3)
    pre = xs @ w1.T + b1
    h = np.maximum(pre, 0)
    y = h @ w2.T
    dy = 2 * (y - t.double().numpy().reshape(-1, 2)) / y.size
    gw2 = dy.T @ h
    dh = dy @ w2
    dpre = dh * (pre > 0)
    return w1, b1, w2, dpre.T @ xs, dpre.sum(0), gw2, h, dh


def test_taylor_and_fisher_by_hand(mlp):
    model, a, x = mlp
    g = hidden_group(a)
    t = torch.randn(2, 5, 2)
    batches = [Batch((x,), target=t), Batch((x,), target=t)]
    w1, b1, w2, gw1, gb1, gw2, h, dh = _grads_by_hand(model, x, t)
    taylor = [np.abs(w1 * gw1).sum(1), np.abs(b1 * gb1), np.abs(w2 * gw2).sum(0)]
    # mask Fisher: per sample b, g_b(u) = sum_t h[b,t,u] * dL/dh[b,t,u]; F_uu = sum_b g_b(u)^2 (per batch, twice)
    g_mask = (h * dh).reshape(2, 5, 4).sum(1)
    fisher = 2 * (g_mask**2).sum(0)
    got_t = TaylorImportance(normalize=False).scores(model, a, batches)[g.id]
    got_f = FisherImportance().scores(model, a, batches)[g.id]
    np.testing.assert_allclose(got_t, sum(taylor), rtol=1e-4)
    np.testing.assert_allclose(got_f, fisher, rtol=1e-4)
    np.testing.assert_allclose(TaylorImportance().scores(model, a, batches)[g.id], aggregate(taylor, 4), rtol=1e-4)


def test_gradient_scores_without_targets_are_not_zero(mlp):
    """A plain KD loss has zero gradient at the teacher; the sampled-target loss does not."""
    model, a, x = mlp
    g = hidden_group(a)
    for est in (TaylorImportance(), FisherImportance()):
        s = est.scores(model, a, [x, x])[g.id]
        assert np.all(np.isfinite(s)) and s.sum() > 0


def test_activation_by_hand(mlp):
    model, a, x = mlp
    g = hidden_group(a)
    w1, b1 = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    x2 = torch.randn(3, 5, 3)
    total = np.zeros(4)
    for xb in (x, x2):
        h = np.maximum(xb.double().numpy() @ w1.T + b1, 0)  # the input of fc2: [B, T, 4]
        total += (np.abs(h).mean(axis=1) ** 2).sum(axis=0)
    got = ActivationImportance().scores(model, a, [x, x2])[g.id]
    np.testing.assert_allclose(got, np.sqrt(total), rtol=1e-5)


def test_activation_masks_padding(mlp):
    model, _a, x = mlp

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    wrapped = Wrap().eval()
    aw = analyze(wrapped, (x,), {"attention_mask": torch.ones(2, 5)})
    (g,) = [g for g in aw.prunable() if g.n_units == 4]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x_pad = x.clone()
    x_pad[0, 3:] = 100.0  # padding garbage must not count
    got = ActivationImportance().scores(wrapped, aw, [Batch((x_pad,), {"attention_mask": mask})])[g.id]
    ref = ActivationImportance().scores(
        wrapped, aw, [Batch((x[:1, :3],), {"attention_mask": mask[:1, :3]}), Batch((x[1:],), {"attention_mask": mask[1:]})]
    )[g.id]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_passes_write_scores_and_fact(mlp):
    model, _, x = mlp
    for name in ("magnitude", "taylor", "fisher", "activation"):
        state = CompileState(model, (x,), calib_data=lambda: [torch.randn(2, 5, 3) for _ in range(2)])
        PassManager(build_pipeline(f"importance.{name}")).run(state)
        assert "importance" in state.facts
        s = state.working()
        assert s.metrics["importance_method"] == name
        g = hidden_group(state.analysis())
        assert s.importance[g.id].shape == (4,)
        assert get_estimator(name).name == name


def test_random_calibration_warns(mlp, capsys):
    model, _, x = mlp
    state = CompileState(model, (x,))
    batches = calibration_batches(state, 3)
    assert len(batches) == 3 and batches[0].args[0].shape == x.shape
    assert not torch.equal(batches[0].args[0], x)
    assert "scores will be poor" in capsys.readouterr().err.replace("\n", " ")
