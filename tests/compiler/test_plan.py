"""The planner: ``--ratio`` as a typed ``Ratio`` checked once, and each student planned once
(drafted before the teacher loads, completed when the distillation is known)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.pipeline import PassManager
from potstill.plan import CompileOptions, Ratio, StudentPlanner, apply_recipe, plan_students
from potstill.profiles import DeviceProfile, LatencyEntry, LatencyTable, load_profile
from potstill.state import CompileState
from torch import nn


def test_a_ratio_is_a_fraction_of_the_macs_checked_when_made() -> None:
    assert Ratio(0.3).tag() == "macs30"
    assert Ratio(0.3, "prunable").width_pass().spec() == "prune.width{ratio=0.3,ratio_of=prunable}"
    with pytest.raises(InputError, match=r"--ratio 0\.99: expected the fraction of the MACs \(or latency\) to remove"):
        Ratio(0.99)
    with pytest.raises(InputError, match="--ratio-of 'rest'"):
        Ratio(0.3, "rest")
    with pytest.raises(InputError, match=r"--ratio 0\.001"):
        StudentPlanner(CompileOptions(ratios=(0.5, 0.001)))  # checked when the planner is made, before any target


def test_the_width_pass_gets_the_ratio_as_a_value_not_text() -> None:
    # a pipeline string would have written it with 6 significant digits ({r:g}: 0.123457)
    (plan,) = plan_students(CompileOptions(ratios=(0.1234567,), distill=False), "onnxruntime")
    assert plan.name == "macs12"
    width = plan.passes[0]
    assert width.name == "prune.width" and width.options.ratio == 0.1234567


def test_drafts_wait_for_the_distillation_and_plan_once(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\ntrain: {lr: 0.01}\nratio: [0.3, 0.6]\n")
    planner = StudentPlanner(apply_recipe(CompileOptions(recipe=str(recipe))))
    planner.draft("onnxruntime")  # the recipe's train: waits for the distillation chosen after loading
    plans = planner.plans(distill_epochs=2)
    assert {p.name: p.spec for p in plans} == {
        f"macs{r}": f"prune.width{{ratio=0.{r // 10}}},bn.recalibrate,fidelity{{stage=before_distill}},"
                 "distill{epochs=2,lr=0.01},lower.onnxruntime,record"
        for r in (30, 60)
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="runs once"):
        planner.plans(distill_epochs=2)


def test_a_bad_pipeline_fails_at_the_draft() -> None:
    planner = StudentPlanner(CompileOptions(pipeline="prune.width{ratio=0.5},no.such.pass"))
    with pytest.raises(InputError, match=r"unknown pass 'no\.such\.pass'"):
        planner.draft("onnxruntime")
    with pytest.raises(InputError, match="--target 'no-such-target'"):
        StudentPlanner(CompileOptions()).draft("no-such-target")


def _table_profile() -> DeviceProfile:
    """The cpu profile with a (made-up) measured latency table."""
    table = LatencyTable(entries=[LatencyEntry(op="conv2d", cin=16, cout=16, kernel=3, hw=8, groups=1, stride=1, ms=0.01)])
    return load_profile("cpu").model_copy(update={"name": "cpu-table", "latency_table": table})


def test_the_name_says_what_the_ratio_is_of_as_the_width_pass_budgets_it() -> None:
    """A profile with a latency table names ``latency30``, one without ``macs30`` (``p``: of the
    prunable part), and ``prune.width`` budgets the same ratio on that same basis."""
    cpu, table = load_profile("cpu"), _table_profile()
    names = {(profile.name, of): [p.name for p in plan_students(CompileOptions(ratios=(0.3,), ratio_of=of, distill=False),
                                                                "onnxruntime", profile=profile)]
             for profile in (cpu, table) for of in ("total", "prunable")}  # fmt: skip
    assert names == {("cpu", "total"): ["macs30"], ("cpu", "prunable"): ["macs30p"],
                     ("cpu-table", "total"): ["latency30"], ("cpu-table", "prunable"): ["latency30p"]}  # fmt: skip
    # a $ratio pipeline is named by the prune.width that reads it; else only by the ratio
    (plan,) = plan_students(CompileOptions(pipeline="prune.width{ratio=$ratio,ratio_of=prunable}", ratios=(0.3,)),
                            "onnxruntime", profile=table)  # fmt: skip
    assert plan.name == "latency30p"
    (plan,) = plan_students(CompileOptions(pipeline="prune.width{per_kind=[channels=$ratio]}", ratios=(0.3,)), "onnxruntime")
    assert plan.name == "ratio30"

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 8, 3, padding=1)).eval()  # fmt: skip
    for profile in (cpu, table):
        # once the teacher is loaded the name holds: a CNN's channels are budgeted as the profile says
        planner = StudentPlanner(CompileOptions(ratios=(0.3,), distill=False))
        planner.draft("onnxruntime", profile)
        state = CompileState(net, (torch.randn(1, 3, 8, 8),), profile=profile)
        (plan,) = planner.plans(state=state)
        PassManager([p for p in plan.passes if p.name == "prune.width"]).run(state)
        asked = state.working().metrics["prune"]["budget"]["asked"]
        assert asked == {"macs30": "ratio 0.3 of the MACs", "latency30": "ratio 0.3 of the latency (table)"}[plan.name]
