"""NSGA-II's sort and crowding, the cost predictors against the extracted subnets' own analysis,
and budgets that cannot be met."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from potstill.errors import InputError
from potstill.ir.capture import analyze
from potstill.passes.elastic import extract, make_supernet
from potstill.passes.elastic.cost import CostModel
from potstill.passes.elastic.search import (
    Candidate,
    SearchSettings,
    _dominates,
    crowding_distance,
    non_dominated_sort,
    search,
)
from potstill.passes.elastic.space import SubnetConfig
from potstill.profiles import load_profile

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
POINT = st.tuples(st.floats(0, 1), st.floats(0.1, 10), st.floats(0.1, 10), st.sampled_from([0.0, 0.0, 0.5, 1.0]))


def _cands(points) -> list[Candidate]:
    return [Candidate((i,), SubnetConfig(()), a, t, m, v) for i, (a, t, m, v) in enumerate(points)]


@settings(max_examples=60, deadline=None)
@given(st.lists(POINT, min_size=1, max_size=25))
def test_fronts_are_non_dominated_sorting(points) -> None:
    pop = _cands(points)
    fronts = non_dominated_sort(pop)
    assert sorted(c.genome for f in fronts for c in f) == sorted(c.genome for c in pop)
    for k, front in enumerate(fronts):
        for c in front:
            assert c.rank == k
            # nothing in this or a later front dominates it ...
            assert not any(_dominates(o, c) for f in fronts[k:] for o in f)
            # ... and something in the front before does
            if k:
                assert any(_dominates(o, c) for o in fronts[k - 1])
    feasible = [c for c in pop if c.violation == 0]
    if feasible:  # Deb's rule: a feasible point always beats an infeasible one
        assert all(c.violation == 0 for c in fronts[0])


def test_crowding_gives_the_ends_infinity_and_the_middle_its_gaps() -> None:
    front = _cands([(0.9, 3.0, 3.0, 0.0), (0.5, 2.0, 2.0, 0.0), (0.1, 1.0, 1.0, 0.0)])
    crowding_distance(front)
    assert front[0].crowding == front[2].crowding == float("inf")
    assert front[1].crowding == pytest.approx(3.0)  # (2/2) per objective, three objectives


def test_cost_model_matches_the_extracted_subnets(cnn) -> None:
    net = make_supernet(cnn, (X[:1],), batches=[X])
    profile = load_profile("cpu")
    costs = CostModel.build(net, profile, example_batch=1)
    rng = random.Random(0)
    configs = [net.space.largest(), net.space.smallest(), net.space.sample(rng)]
    for cfg in configs:
        sub = extract(net, cfg).module
        a = analyze(sub, (X[:1],))
        assert costs.weight_bytes(cfg) == 4 * a.cost.params  # exact: the sliced shapes are known
        mem = (4 * a.cost.params + a.cost.peak_activation_bytes) / 2**20  # what measured_memory_mb computes
        assert costs.memory_mb(cfg) == pytest.approx(mem, rel=0.15)
    assert costs.raw_latency_ms(net.space.smallest()) < costs.raw_latency_ms(net.space.largest())
    # two anchors: the calibrated model passes through both
    costs.calibrate([(net.space.largest(), 2.0), (net.space.smallest(), 0.5)])
    assert costs.latency_ms(net.space.largest()) == pytest.approx(2.0)
    assert costs.latency_ms(net.space.smallest()) == pytest.approx(0.5)


def test_a_memory_budget_no_subnet_meets_is_an_error_before_any_timing(cnn) -> None:
    net = make_supernet(cnn, (X[:1],), batches=[X])
    with pytest.raises(InputError, match="even the smallest subnet"):
        search(net, cnn, load_profile("cpu"), (X[:1],), {}, [X], [X], SearchSettings(memory_mb=1e-6))


def test_students_spread_over_the_points_near_the_best_fidelity() -> None:
    from potstill.passes.elastic.search import _spread_order

    # (fidelity, latency): fast and poor, then a plateau near the best
    points = [(0.5, 1.0), (0.85, 2.0), (0.9, 3.0), (0.985, 4.0), (0.99, 5.0), (1.0, 6.0)]
    feasible = _cands([(a, t, 1.0, 0.0) for a, t in points])
    first = [c.accuracy for c in _spread_order(feasible, 3, floor=0.8, band=0.02)[:3]]
    assert first == [0.985, 0.99, 1.0]
    # too few within the band: widen to the floor (0.5 stays out), then to everything
    assert [c.accuracy for c in _spread_order(feasible, 4, floor=0.8, band=0.02)[:4]] == [0.85, 0.9, 0.99, 1.0]
    assert len(_spread_order(feasible, 6, floor=0.8, band=0.02)) == 6
