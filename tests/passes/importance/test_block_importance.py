"""Block importance (BI, output MSE, DP) on a residual toy whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch
from potstill.inputs.data import Batch
from potstill.passes.importance.blocks import (
    BlockImportance,
    block_influence,
    iterative_output_error,
    output_error,
    skipped,
)
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn

from ..toys import Res


class Toy(nn.Module):
    """Block i's residual branch is scaled by scales[i]: a zero branch is the identity."""

    def __init__(self, scales=(1.0, 0.0, 0.3, 2.0)) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Res(s) for s in scales])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


NAMES = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


@pytest.fixture
def toy():
    return Toy().eval(), [Batch((torch.randn(4, 6, 8),)) for _ in range(2)]


def test_block_influence_by_hand(toy):
    model, batches = toy
    bi = block_influence(model, NAMES, batches)
    assert bi["blocks.1"] == pytest.approx(0.0, abs=1e-6)  # identity: cos = 1
    # hand-computed for block 0 on the first batch alone
    x = batches[0].args[0]
    y = model.blocks[0](x)
    expected = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean().item()
    assert block_influence(model, ["blocks.0"], batches[:1])["blocks.0"] == pytest.approx(expected, rel=1e-5)
    assert min(bi, key=bi.__getitem__) == "blocks.1"


def test_skipping_is_removal(toy):
    model, batches = toy
    x = batches[0].args[0]
    with skipped(model, ["blocks.0", "blocks.2"]):
        out = model(x)
    ref = model.head(model.blocks[3](model.blocks[1](x)))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model(x), model.head(model.blocks(x)))  # hooks are gone


def test_output_error_iterative(toy):
    model, batches = toy
    ref = [model(b.args[0]).detach() for b in batches]
    assert output_error(model, ["blocks.1"], batches, ref) == pytest.approx(0.0, abs=1e-12)
    z = list(ref)
    with skipped(model, ["blocks.3"]):
        z3 = [model(b.args[0]).detach() for b in batches]
    expected = sum(((a - b) ** 2).sum() for a, b in zip(z, z3)) / sum((a**2).sum() for a in z)
    assert output_error(model, ["blocks.3"], batches, ref) == pytest.approx(float(expected), rel=1e-5)
    order = iterative_output_error(model, NAMES, batches, rounds=2)
    assert order[0][0] == "blocks.1" and order[0][1] == pytest.approx(0.0, abs=1e-12)
    assert len(order) == 2 and order[1][1] >= order[0][1]


def test_all_methods_rank_the_identity_block_last(toy):
    model, batches = toy
    for method in ("bi", "mse", "dp"):
        scores = BlockImportance(method).scores(model, NAMES, batches)
        assert min(scores, key=scores.__getitem__) == "blocks.1", method


def test_blocks_pass_with_user_metric():
    model = Toy().eval()
    x = torch.randn(2, 6, 8)
    calls = []

    def metric(m: nn.Module) -> float:
        calls.append(1)
        # a user metric: agreement with a fixed reference output
        with torch.no_grad():
            return -float(((m(x) - ref) ** 2).mean())

    with torch.no_grad():
        ref = model(x)
    state = CompileState(model, (x,), calib_data=lambda: [x], metric=metric)
    PassManager(build_pipeline("importance.blocks{method=dp,max_removed=2}")).run(state)
    s = state.working()
    assert "block_importance" in state.facts
    assert s.metrics["depth_dp"]["masks"][1] == ["blocks.1"]
    assert len(calls) == s.metrics["depth_dp"]["evaluations"] <= 4 * 2 + 1
