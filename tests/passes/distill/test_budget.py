"""The default repair: label-free distillation under a wall-clock budget.

The budget stops training (fewer steps than the epochs hold, and the record says so), label-free KD
raises fidelity on held-out inputs, and the default options follow the teacher's task."""

from __future__ import annotations

import math

import pytest
import torch
from potstill.errors import InputError
from potstill.fidelity import measure_fidelity
from potstill.passes.distill import TensorBatches
from potstill.passes.distill.budget import TimeBudget
from potstill.passes.distill.defaults import default_distill_options, distill_spec
from potstill.passes.distill.schedule import cosine_factor
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student

from .conftest import mlp


def _state(teacher, x: torch.Tensor) -> CompileState:
    # unlabelled batches: the inputs alone
    state = CompileState(teacher, (x[:2],), out_dir=None, train_data=TensorBatches(x[:256], batch_size=16))
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    return state


def test_the_time_budget_stops_training_before_the_epochs_end(teacher_data) -> None:
    teacher, x, _ = teacher_data
    state = _state(teacher, x)
    # 40 epochs of 16 batches; a budget of 6 ms ends the run long before 640 steps
    PassManager(build_pipeline("distill{epochs=40,minutes=0.0001,lr=0.01,progress=false}")).run(state)
    d = state.working().metrics["distill"]
    assert 1 <= d["steps"] < 40 * 16 and d["planned_steps"] == 40 * 16
    assert d["stopped_by_budget"] is True and d["budget_minutes"] == 0.0001 and d["minutes_used"] > 0


def test_without_a_budget_the_epochs_run_to_the_end(teacher_data) -> None:
    teacher, x, _ = teacher_data
    state = _state(teacher, x)
    PassManager(build_pipeline("distill{epochs=2,lr=0.01,progress=false}")).run(state)
    d = state.working().metrics["distill"]
    assert d["steps"] == 2 * 16 and d["stopped_by_budget"] is False and d["budget_minutes"] is None


def test_minutes_alone_trains_until_the_budget_is_spent(teacher_data) -> None:
    teacher, x, _ = teacher_data
    state = _state(teacher, x)
    PassManager(build_pipeline("distill{minutes=0.002,lr=0.01,progress=false}")).run(state)
    d = state.working().metrics["distill"]
    assert d["stopped_by_budget"] is True and d["planned_steps"] is None and d["steps"] >= 1


@pytest.mark.parametrize("bad", ["minutes=0", "minutes=-1", "minutes=nan", "epochs=0"])
def test_a_budget_that_cannot_train_is_an_error(bad: str) -> None:
    with pytest.raises(InputError, match=bad.split("=", maxsplit=1)[0]):
        build_pipeline(f"distill{{{bad}}}")
    if bad.startswith("minutes"):
        with pytest.raises(InputError, match="positive"):
            TimeBudget(float(bad.split("=")[1]) * 60)


def test_the_schedule_decays_with_the_budget_spent() -> None:
    # step 1 of a million planned, but 90 % of the budget spent: the rate is near its end, not its peak
    assert cosine_factor(1, 10**6, 0, 0.0, spent=0.9) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert cosine_factor(1, 10**6, 0, 0.0, spent=0.0) > 0.99


def test_label_free_kd_raises_fidelity_on_held_out_inputs(teacher_data) -> None:
    teacher, x, _ = teacher_data
    state = _state(teacher, x)
    heldout = [x[384 + i : 384 + i + 32] for i in range(0, 128, 32)]  # never trained on
    before = measure_fidelity(teacher, state.working().module, heldout, "classification")
    spec = distill_spec(default_distill_options("classification", epochs=4, minutes=None, images=False,
                                                given={"lr"}))
    PassManager(build_pipeline(spec.replace("}", ",lr=0.01,progress=false}"))).run(state)
    after = measure_fidelity(teacher, state.working().module, heldout, "classification")
    assert state.working().metrics["distill"]["teacher_outputs"]["mode"] == "cached"  # the classifier default
    assert before.score < 0.5 and after.score > before.score + 0.3
    assert after.measures["kl"] < before.measures["kl"]


@pytest.mark.parametrize(("task", "images", "expected"), [
    ("classification", False, "distill{method=kd,lr_probe=[0.001,0.00025,6.25e-05],teacher_outputs=cached,epochs=3}"),
    ("classification", True, "distill{method=kd,lr_probe=[0.001,0.00025,6.25e-05],epochs=3}"),  # augmented: live
    # a pretrained teacher's lr is probed among its task's lr, a quarter and a sixteenth of it
    ("embedding", False, "distill{method=cosine+hidden,lr_probe=[0.0002,5.0e-05,1.25e-05],epochs=3}"),
    ("causal_lm", False,
     "distill{method=kd,lr_probe=[0.0001,2.5e-05,6.25e-06],teacher_outputs=cached,teacher_top_k=64,epochs=3}"),
])  # fmt: skip
def test_the_default_objective_follows_the_task(task: str, images: bool, expected: str) -> None:
    assert distill_spec(default_distill_options(task, epochs=3, minutes=None, images=images)) == expected
    build_pipeline(expected)  # a valid pass


def test_recipe_training_keys_override_the_defaults() -> None:
    opts = default_distill_options("causal_lm", epochs=None, minutes=10.0, images=False, given={"lr", "teacher_outputs"})
    assert opts == {"method": "kd", "minutes": 10.0}
    opts = default_distill_options("classification", epochs=None, minutes=None, images=True, augment=False)
    assert opts == {"method": "kd", "lr_probe": (1e-3, 2.5e-4, 6.25e-5), "teacher_outputs": "cached", "augment": False}
