"""prune.width on a small CNN: structure, alignment, numerics vs the masked teacher, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from potstill.errors import InputError, PassError
from potstill.ir.surgery import keep_top, masked_reference
from potstill.passes.importance.magnitude import MagnitudeImportance
from potstill.passes.prune.budget import CostModel
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn


class Basic(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class Net(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.Sequential(Basic(c), Basic(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def make_net(c: int = 32) -> Net:
    torch.manual_seed(0)
    net = Net(c).eval()
    for m in net.modules():  # non-trivial BN so that the masked comparison means something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return net


X = torch.randn(2, 3, 12, 12)


def run(spec: str, net: nn.Module | None = None, **kw) -> CompileState:
    state = CompileState(net or make_net(), (X,), calib_data=lambda: [torch.randn(2, 3, 12, 12)], **kw)
    PassManager(build_pipeline(spec)).run(state)
    return state


def test_per_kind_aligned_and_equal_to_masked_teacher():
    teacher = make_net()
    state = run("importance.magnitude,prune.width{per_kind=[channels=0.7],reconstruct=false}", teacher)
    s = state.working()
    assert "pruned" in state.facts and "importance" not in state.facts
    widths = s.metrics["arch"]["widths"]
    assert widths and all(w["units"] == 8 and w["of"] == 32 for w in widths.values())  # 9.6 -> 8
    assert s.module.stem[0].out_channels == 8 and s.module.layers[0].c1.out_channels == 8
    # numerically: the student is the teacher with the same channels zeroed
    a = state.teacher_analysis()
    scores = MagnitudeImportance().scores(teacher, a)
    keep = {g.id: keep_top(g, scores[g.id], 8) for g in a.prunable() if g.kind == "channels" and g.n_units == 32}
    ref = masked_reference(teacher, a, keep)
    with torch.no_grad():
        torch.testing.assert_close(s.module(X), ref(X), rtol=1e-4, atol=1e-5)
    assert s.metrics["arch"]["macs"] < a.cost.macs / 8
    assert s.metrics["prune"]["reconstructed"] == []


def test_ratio_is_a_macs_budget_checked_on_the_student():
    net = make_net()
    base = CompileState(net, (X,)).analysis().cost.macs
    # widths move in steps of 8 of 32 channels: one width for all (local) can only reach 0.56 or 0.26
    # of the MACs; the global allocation lands nearer the budget
    for allocation, least in (("global", 0.35), ("local", 0.25)):
        s = run(f"prune.width{{ratio=0.5,allocation={allocation}}}", net).working()
        assert s.metrics["arch"]["macs"] <= 0.5 * base
        assert s.metrics["arch"]["macs"] > least * base
        budget = s.metrics["prune"]["budget"]
        assert budget["measured"] <= budget["limit"] and budget["asked"] == "ratio 0.5 of the MACs"
        assert all(w["units"] % 8 == 0 for w in s.metrics["arch"]["widths"].values())


def test_align_option_and_small_ratio():
    s = run("prune.width{per_kind=[channels=0.3],align=1}").working()
    assert {w["units"] for w in s.metrics["arch"]["widths"].values()} == {22}
    # 31.7 of 32 rounds to 32 at any multiple: nothing to remove is exit 2, as "no prunable groups" is
    with pytest.raises(PassError, match="removes no unit of the") as info:
        run("prune.width{per_kind=[channels=0.01]}")
    assert isinstance(info.value.__cause__, InputError)


def test_profile_multiple_falls_back_where_it_removes_nothing():
    # 8 channels per group at the profile's multiple 8: 0.3 of 8 rounds to none; multiple 1 prunes
    s = run("prune.width{per_kind=[channels=0.3]}", make_net(8)).working()
    assert {w["units"] for w in s.metrics["arch"]["widths"].values()} == {6}


@pytest.mark.parametrize(("spec", "match"), [
    ("prune.width", "say how much to prune"),
    ("prune.width{ratio=1.5}", "in \\(0, 1\\)"),
    ("prune.width{ratio=0}", "in \\(0, 1\\)"),
    ("prune.width{ratio=abc}", "option 'ratio' must be float"),
    ("prune.width{ratio=0.5,macs_budget=0.4}", "not ratio and macs_budget"),
    ("prune.width{macs_budget=-1}", "must be > 0"),
    ("prune.width{per_kind=[channels=1.5]}", "in \\[0, 1\\)"),
    ("prune.width{per_kind=[channels=0.5],allocation=local}", "not to per_kind"),
    ("prune.width{ratio=0.5,importance=bogus}", "unknown importance 'bogus'"),
    ("prune.width{ratio=0.5,steps=0}", "steps must be an integer >= 1"),
    ("prune.width{ratio=0.5,reconstruct=maybe}", "option 'reconstruct' must be"),
    ("importance.taylor{batches=0}", "batches must be an integer >= 1"),
    ("importance.magnitude{p=3}", "p must be 1 or 2"),
    ("importance.obs{ridge=0}", "ridge must be > 0"),
])
def test_option_errors_on_construction(spec, match):
    with pytest.raises(InputError, match=match):
        build_pipeline(spec)


def test_two_estimators_for_one_pruning_is_an_error():
    with pytest.raises(Exception, match="two estimators for one pruning") as info:
        run("importance.taylor,prune.width{ratio=0.5,importance=fisher}")
    assert isinstance(info.value.__cause__, InputError)
    # the same name twice is coherent: the pass's scores are used
    s = run("importance.taylor,prune.width{ratio=0.5,importance=taylor}").working()
    assert s.metrics["prune"]["importance"] == "taylor"
    # auto with data: Kwon's mask Fisher; no pass before and no option: auto
    assert run("prune.width{ratio=0.5}").working().metrics["prune"]["importance"] == "fisher"


def test_macs_and_params_budgets():
    net = make_net()
    base = CompileState(net, (X,)).analysis().cost
    s = run("prune.width{macs_budget=0.5}", net).working()
    assert s.metrics["arch"]["macs"] <= 0.5 * base.macs
    s = run("prune.width{params_budget=0.3}", net).working()
    assert s.metrics["arch"]["params"] <= 0.3 * base.params
    with pytest.raises(Exception, match="cannot be met"):
        run("prune.width{macs_budget=1000}", net)


def test_cost_model_predicts_params_exactly():
    net = make_net()
    state = CompileState(net, (X,))
    a = state.analysis()
    groups = [g for g in a.prunable() if g.kind == "channels"]
    keep_counts = {g.id: 8 for g in groups}
    cm = CostModel.build(net, a)
    from potstill.ir.capture import analyze
    from potstill.ir.surgery import prune_width

    student = prune_width(net, a, {g.id: list(range(8)) for g in groups})
    b = analyze(student, (X,))
    assert cm.params(keep_counts) == b.cost.params
    assert cm.macs(keep_counts) == pytest.approx(b.cost.macs, rel=0.02)


def test_iterative_steps_and_estimators():
    for est in ("taylor", "fisher", "activation", "magnitude"):
        s = run(f"prune.width{{per_kind=[channels=0.5],steps=2,importance={est}}}").working()
        assert all(w["units"] == 16 for w in s.metrics["arch"]["widths"].values())
        assert sum("prune.width step" in h for h in s.history) == 2
        assert s.module(X).shape == (2, 10)


def test_per_kind_errors():
    with pytest.raises(Exception, match="per_kind"):
        run("prune.width{per_kind=[bogus=0.5]}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(0.05, 0.9), st.sampled_from(["magnitude", "activation"]), st.sampled_from([1, 8, 16]))
def test_pruned_models_keep_running(ratio, importance, align):
    try:
        state = run(f"prune.width{{ratio={ratio:.3f},importance={importance},align={align}}}")
    except PassError as e:  # coarse alignment: an honest refusal, never a student over budget
        assert isinstance(e.__cause__, InputError) and "cannot be met" in str(e)
        return
    s = state.working()
    out = s.module(X)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for w in s.metrics.get("arch", {}).get("widths", {}).values():
        assert 1 <= w["units"] <= w["of"]
        assert w["units"] == w["of"] or w["units"] % align == 0
    assert np.isfinite(float(out.detach().sum()))


def test_latency_budget_from_the_profile():
    from potstill.profiles import load_profile

    profile = load_profile("cpu")
    net = make_net()
    state = CompileState(net, (X,), profile=profile)
    a = state.analysis()
    cm = CostModel.build(net, a, (X,), with_layers=True)
    full = cm.latency_ms({g.id: g.n_units for g in a.prunable()}, profile)
    budget = 0.5 * full
    s = run(f"prune.width{{latency_budget_ms={budget}}}", net, profile=profile).working()
    b = CompileState(s.module, (X,)).analysis()
    cm2 = CostModel.build(s.module, b, (X,), with_layers=True)
    assert cm2.latency_ms({g.id: g.n_units for g in b.prunable()}, profile) <= budget * 1.01
    assert s.metrics["arch"]["macs"] < a.cost.macs


def _sensitivity_state(net: nn.Module) -> tuple[CompileState, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(6)]
    held = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]
    state = CompileState.from_teacher(net, (X[:1],), calib_data=lambda: iter(calib), heldout_data=lambda: iter(held))
    state.new_student("s")
    return state, held


def test_sensitivity_allocation_prunes_the_group_the_output_does_not_need():
    """The second block's branch is scaled by 1e-3, so its hidden channels barely reach the output.
    Magnitude scores, normalised per group, cannot see that; measured sensitivity can: it narrows
    that group further, meets the same MACs budget by measurement, and lands closer to the teacher."""
    from potstill.passes.prune.heldout import HeldoutReference, as_batches

    net = make_net()
    with torch.no_grad():
        net.layers[1].b2.weight.mul_(1e-3)
        net.layers[1].b2.bias.zero_()
    found = {}
    for allocation in ("global", "sensitivity"):
        state, held = _sensitivity_state(net)
        spec = f"prune.width{{ratio=0.3,importance=magnitude,allocation={allocation},align=4}}"
        PassManager(build_pipeline(spec)).run(state)
        student = state.students[0]
        rec = student.metrics["prune"]
        assert rec["allocation"] == allocation and rec["budget"]["met"], rec["budget"]
        found[allocation] = (student.module.layers[1].c1.out_channels,
                             HeldoutReference.of(net, as_batches(held)).loss(student.module))
    assert found["sensitivity"][0] < found["global"][0], found
    assert found["sensitivity"][1] < found["global"][1], found
    curves = {c["group"]: c["loss"] for c in rec["sensitivity"]}
    quiet = next(v for k, v in curves.items() if k.startswith("layers.1.c1"))
    loud = next(v for k, v in curves.items() if k.startswith("layers.0.c1"))
    assert quiet[min(quiet)] < loud[min(loud)]  # the measured curve is what tells them apart


def test_auto_compares_sensitivity_with_the_estimators_and_keeps_the_closest():
    state, _ = _sensitivity_state(make_net())
    PassManager(build_pipeline("prune.width{ratio=0.3,align=4}")).run(state)
    trials = state.students[0].metrics["prune"]["estimators"]
    assert ("fisher", "sensitivity") in {(t["importance"], t["allocation"]) for t in trials}
    chosen = [t for t in trials if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["heldout_error"] == min(t["heldout_error"] for t in trials)
    assert state.students[0].metrics["prune"]["allocation"] == chosen[0]["allocation"].replace("auto", "global")


def test_sensitivity_allocation_needs_held_out_batches():
    state = CompileState(make_net(), (X,))  # no calibration data: nothing to hold out
    with pytest.raises((InputError, PassError), match="allocation=sensitivity measures each width on held-out"):
        PassManager(build_pipeline("prune.width{ratio=0.3,allocation=sensitivity}")).run(state)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 512), step=st.sampled_from([1, 2, 4, 8, 16]), floor=st.floats(0.0, 0.9),
       groups=st.integers(1, 200))
def test_sensitivity_widths_are_aligned_bounded_and_keep_the_narrowest(n, step, floor, groups):
    from potstill.passes.prune.sensitivity import MAX_TRIALS, candidate_widths, widths_per_group

    most = widths_per_group(groups)
    assert most >= 2 and (groups * most <= MAX_TRIALS or most == 2)
    widths = candidate_widths(n, step, floor, most)
    assert widths == sorted(set(widths), reverse=True) and len(widths) <= most
    assert all(0 < k < n and k % step == 0 for k in widths)
    # allowed: multiples of the step at or above the floor (a width on the floor itself is left
    # to rounding, either way)
    every = [k for k in range(step, n, step) if k >= floor * n]
    on_floor = any(abs(k - floor * n) < 1e-6 for k in range(step, n, step))
    if every and not on_floor:
        assert widths and widths[-1] == min(every)  # the narrowest allowed width is always measured
