"""Kwon et al.'s latency-constrained mask search and the per-sublayer latency model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from potstill.passes.prune.mask_search import predict_ms, search_latency
from potstill.passes.prune.sublayer_latency import (
    PiecewiseLatency,
    fit_piecewise,
    measure_sublayer,
    sample_counts,
)
from potstill.pipeline import PassManager
from potstill.plan import CompileOptions, StudentPlanner
from potstill.state import CompileState

transformers = pytest.importorskip("transformers")


class G:
    """The fields of a coupled group the search reads."""

    def __init__(self, gid: int, kind: str, n_units: int, unit_channels: int) -> None:
        self.id, self.kind, self.n_units, self.unit_channels = gid, kind, n_units, unit_channels


def test_piecewise_fit_recovers_a_known_curve():
    truth = PiecewiseLatency(threshold=3, c=1.5, slope=0.25)
    fit = fit_piecewise([(k, truth(k)) for k in range(1, 13)])
    assert (fit.threshold, fit.c) == (3, pytest.approx(1.5)) and fit.slope == pytest.approx(0.25)
    assert fit(0) == 0.0 and fit(2) == pytest.approx(1.5) and fit(12) == pytest.approx(1.5 + 9 * 0.25)
    assert sample_counts(1536, 8, 12)[0] == 8 and sample_counts(1536, 8, 12)[-1] == 1536
    assert len(sample_counts(1536, 8, 12)) == 12 and sample_counts(4, 1, 12) == [1, 2, 3, 4]


def _case(seed: int):
    rng = np.random.default_rng(seed)
    groups = [G(0, "heads", 4, 8), G(1, "neurons", 6, 8), G(2, "heads", 4, 8), G(3, "neurons", 6, 8)]
    scores = {g.id: rng.gamma(1.0, 1.0, g.n_units) * (3.0 if g.kind == "heads" else 1.0) for g in groups}
    latency = {g.id: PiecewiseLatency(1, 0.5, 1.0 if g.kind == "heads" else 0.4) for g in groups}
    return groups, scores, latency


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_search_respects_the_latency_budget_and_is_optimal(fraction):
    """Every allocation meets the budget, and it keeps as much Fisher as the best of all allocations
    that meet it (brute force over every count per group, best units first)."""
    groups, scores, latency = _case(0)
    full = predict_ms({g.id: g.n_units for g in groups}, latency)
    budget = fraction * full
    res = search_latency(groups, scores, latency, budget, multiple=1, floor=0.0)
    assert res.predicted_ms <= budget + 1e-9 and res.full_ms == pytest.approx(full)
    assert all(1 <= res.keep[g.id] <= g.n_units for g in groups)

    def kept(keep):
        return sum(np.sort(scores[gid])[::-1][:k].sum() for gid, k in keep.items())

    best = max(kept(dict(zip([g.id for g in groups], ks)))
               for ks in itertools.product(*[range(1, g.n_units + 1) for g in groups])
               if predict_ms(dict(zip([g.id for g in groups], ks)), latency) <= budget + 1e-9)
    assert kept(res.keep) == pytest.approx(best)


def test_search_keeps_aligned_counts_and_reports_an_unreachable_budget():
    groups = [G(0, "heads", 12, 32), G(1, "neurons", 64, 1)]
    rng = np.random.default_rng(1)
    scores = {0: rng.random(12), 1: rng.random(64)}
    latency = {0: PiecewiseLatency(2, 1.0, 0.5), 1: PiecewiseLatency(8, 0.2, 0.05)}
    res = search_latency(groups, scores, latency, 4.0, multiple=8, floor=0.1)
    assert res.keep[1] % 8 == 0 and res.predicted_ms <= 4.0
    tight = search_latency(groups, scores, latency, 0.5, multiple=8, floor=0.1)
    assert tight.predicted_ms > 0.5 and tight.keep == {0: 2, 1: 8}  # the base widths, reported as a miss


def test_latency_of_measured_sublayers_grows_with_units():
    """A real ONNX Runtime timing: the widest feed-forward block is slower than the narrowest."""
    table = measure_sublayer("neurons", 512, 1, 128, 4, 32, threads=1, step=8, points=3)
    (k0, ms0), *_, (k1, ms1) = table.points
    assert (k0, k1) == (8, 512) and ms1 > ms0 > 0


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_default_allocation_is_the_latency_search_on_a_transformer():
    """prune.width on a tiny BERT with the cpu profile: heads and neurons are allocated by the
    latency search, whose predicted latency meets ratio of the measured sublayers' latency."""
    from potstill.profiles import load_profile

    model, kw = tiny_bert()

    def calib():
        g = torch.Generator().manual_seed(1)
        return [{"input_ids": torch.randint(0, 100, (4, 16), generator=g),
                 "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]

    state = CompileState(model, (), dict(kw), profile=load_profile("cpu"), calib_data=calib)
    # the student is named by what its width pass budgets on this teacher: the sublayers' latency
    # (a profile-only rule names it macs30, as it does a CNN on this profile: tests/compiler/test_plan.py)
    planner = StudentPlanner(CompileOptions(ratios=(0.3,), distill=False))
    planner.draft("onnxruntime", state.profile)
    (plan,) = planner.plans(state=state)
    assert plan.name == "latency30"
    # ratio 0.3: this BERT's sublayers take microseconds, and the fixed part of their latency (the
    # pools' wake-up) leaves about half of it for the search to remove; under a loaded test run 0.5
    # was beyond what the floors allow
    PassManager([p for p in plan.passes if p.name == "prune.width"]).run(state)
    prune = state.working().metrics["prune"]
    assert prune["allocation"] == "latency" and prune["importance"] == "fisher"
    budget = prune["budget"]
    assert budget["predicted"] <= budget["limit"] * 1.001 and budget["limit"] == pytest.approx(0.7 * budget["full"])
    assert {t["kind"] for t in budget["tables"]} == {"heads", "neurons"}
    widths = state.working().metrics["arch"]["widths"]
    assert all(w["how"] == "latency-search" for w in widths.values())
    assert any(w["units"] < w["of"] for w in widths.values())
