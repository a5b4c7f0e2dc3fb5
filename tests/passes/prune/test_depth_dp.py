"""AmoebaLLM's depth programme on toy metrics with known optima."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from potstill.passes.prune.depth_dp import depth_dp


def test_additive_metric_finds_the_cheapest_blocks():
    cost = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 5.0, "e": 0.5}
    r = depth_dp(list(cost), lambda s: -sum(cost[x] for x in s), 3)
    assert r.masks[1] == ("e",)
    assert set(r.masks[2]) == {"b", "e"}
    assert set(r.masks[3]) == {"b", "c", "e"}
    assert r.values[3] == -3.5
    assert r.evaluations <= len(cost) * 3 + 1
    imp = r.importance(list(cost))
    assert sorted(cost, key=imp.__getitem__)[:3] == ["e", "b", "c"]


def test_masks_keep_model_order_and_every_count():
    names = [f"l{i}" for i in range(6)]
    r = depth_dp(names, lambda s: -len(s) * 1.0 + 0.01 * sum(int(n[1]) for n in s), 5)
    assert sorted(r.masks) == [1, 2, 3, 4, 5]
    for m, mask in r.masks.items():
        assert len(mask) == m and list(mask) == sorted(mask, key=names.index)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=2, max_size=7, unique=True), st.integers(1, 6))
def test_matches_brute_force_on_additive_metrics(costs, m):
    names = [f"b{i}" for i in range(len(costs))]
    cost = dict(zip(names, costs))
    m = min(m, len(names))
    r = depth_dp(names, lambda s: -sum(cost[x] for x in s), m)
    for k in range(1, m + 1):
        best = max(-sum(cost[x] for x in c) for c in itertools.combinations(names, k))
        assert r.values[k] == pytest.approx(best)
