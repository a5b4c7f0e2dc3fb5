"""Global allocation and Kwon et al.'s mask search / rearrangement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from potstill.ir.capture import analyze
from potstill.passes.prune.allocate import allocate, rearrange
from potstill.passes.prune.budget import CostModel
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn

transformers = pytest.importorskip("transformers")


class TwoBranch(nn.Module):
    """Two hidden layers of the same size and cost side by side: x -> (a | b) -> sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.b1, self.b2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


def _groups(model: nn.Module, x: torch.Tensor):
    a = analyze(model, (x,))
    groups = sorted((g for g in a.prunable() if g.n_units == 32), key=lambda g: min(m.param for m in g.members))
    return a, groups


def test_less_important_group_loses_more():
    """Branch b's units matter 100x less (loss-scale scores): under one MACs budget it is pruned
    far more than branch a, and the budget holds."""
    torch.manual_seed(0)
    model, x = TwoBranch().eval(), torch.randn(4, 8)
    a, (ga, gb) = _groups(model, x)
    rng = np.random.default_rng(0)
    scores = {ga.id: rng.uniform(1.0, 2.0, 32), gb.id: rng.uniform(0.01, 0.02, 32)}
    cost = CostModel.build(model, a)
    full = cost.macs({ga.id: 32, gb.id: 32})
    got = allocate([ga, gb], scores, cost.macs, 0.5 * full, multiple=1, comparable=True, floor=0.1)
    assert cost.macs(got.keep) <= 0.5 * full
    assert got.keep[gb.id] < got.keep[ga.id]
    assert got.keep[gb.id] == 4  # cut to its floor (10 % of 32, rounded up) before a loses anything
    assert got.keep[ga.id] < 32  # and then a pays the rest


def test_cost_aware_density():
    """Equal scores, but one group's units cost 4x as much: the expensive group is cut first."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    a = analyze(model, (torch.randn(2, 8),))
    g32, g128 = sorted((g for g in a.prunable()), key=lambda g: g.n_units)
    cost = CostModel.build(model, a)
    full = cost.macs({g32.id: 32, g128.id: 128})
    scores = {g32.id: np.ones(32), g128.id: np.ones(128)}
    got = allocate([g32, g128], scores, cost.macs, 0.8 * full, multiple=1, comparable=True)
    assert got.keep[g32.id] < 32 and got.keep[g128.id] == 128  # 32-unit layer: 136 MACs/unit vs 36


def test_rearrangement_uses_interactions():
    """Units 0 and 1 have the smallest diagonal Fisher but the same gradient, so dropping both
    doubles the loss; unit 2 (slightly larger diagonal) cancels either of them. The rearrangement
    drops {one of 0/1, 2}, whose joint loss ||sum v||^2 is far below that of the diagonal's pick."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 1))
    grads = np.concatenate([a, a, -1.1 * a, 3 * rng.normal(size=(64, 1))], axis=1)

    def loss(keep: list[int]) -> float:
        dropped = [i for i in range(4) if i not in keep]
        return float((grads[:, dropped].sum(1) ** 2).sum())

    diagonal = sorted(np.argsort(-(grads**2).sum(0))[:2].tolist())
    assert diagonal == [2, 3]
    keep = rearrange(grads, 2)
    assert 2 not in keep and 3 in keep and len(keep) == 2
    assert loss(keep) < 0.01 * loss(diagonal)
    assert rearrange(grads, 4) == [0, 1, 2, 3]


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_kwon_mask_search_meets_the_macs_constraint_on_tiny_bert():
    model, kw = tiny_bert()

    def calib():
        g = torch.Generator().manual_seed(1)
        return [{"input_ids": torch.randint(0, 100, (4, 16), generator=g),
                 "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]

    for ratio in (0.5,):
        state = CompileState(model, (), dict(kw), calib_data=calib)
        PassManager(build_pipeline(f"prune.width{{ratio={ratio},align=1}}")).run(state)
        s = state.working()
        prune = s.metrics["prune"]
        assert prune["importance"] == "fisher" and prune["allocation"] == "global"
        assert prune["macs_after"] <= (1 - ratio) * prune["macs_before"]
        assert prune["macs_after"] >= (1 - ratio - 0.1) * prune["macs_before"]  # about R, not far more
        kinds = {w["kind"] for w in s.metrics["arch"]["widths"].values()}
        assert kinds == {"heads", "neurons"}
        # the student is a working BERT with fewer heads / neurons, refitted layer by layer
        assert len(prune["reconstructed"]) == 6
        with torch.no_grad():
            assert torch.isfinite(s.module(**kw).last_hidden_state).all()
