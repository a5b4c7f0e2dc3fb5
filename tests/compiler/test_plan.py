"""The planner: ``--ratio`` as a typed ``Ratio`` checked once, and each student planned once
(drafted before the teacher loads, completed when the distillation is known)."""

from __future__ import annotations

from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.plan import CompileOptions, Ratio, StudentPlanner, apply_recipe, plan_students


def test_a_ratio_is_a_fraction_of_the_macs_checked_when_made() -> None:
    assert Ratio(0.3).tag == "w30"
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
    assert plan.name == "w12"
    width = plan.passes[0]
    assert width.name == "prune.width" and width.options.ratio == 0.1234567


def test_drafts_wait_for_the_distillation_and_plan_once(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\ntrain: {lr: 0.01}\nratio: [0.3, 0.6]\n")
    planner = StudentPlanner(apply_recipe(CompileOptions(recipe=str(recipe))))
    planner.draft("onnxruntime")  # the recipe's train: waits for the distillation chosen after loading
    plans = planner.plans(distill_epochs=2)
    assert {p.name: p.spec for p in plans} == {
        f"w{r}": f"prune.width{{ratio=0.{r // 10}}},bn.recalibrate,fidelity{{stage=before_distill}},"
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
