from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import TensorBatches
from potstill.passes.distill.pass_ import DistillPass
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student

from .conftest import mlp


def _state(teacher_data, tmp_path: Path | None, labelled: bool = True) -> CompileState:
    teacher, x, y = teacher_data
    train = TensorBatches(x[:384], y[:384], batch_size=32) if labelled else TensorBatches(x[:384], batch_size=32)
    test = TensorBatches(x[384:], y[384:], batch_size=128, shuffle=False)
    state = CompileState(teacher, (x[:2],), out_dir=tmp_path, train_data=train, eval_data=test)
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    return state


def test_distill_pass_from_a_pipeline_string(teacher_data, tmp_path: Path) -> None:
    state = _state(teacher_data, tmp_path)
    passes = build_pipeline("distill{loss=kd,epochs=4,lr=0.01,temperature=2,progress=false,checkpoint_every=10}")
    assert passes[0].spec() == "distill{epochs=4,lr=0.01,temperature=2.0,checkpoint_every=10,progress=False}"
    before = state.working().module[0].weight.clone()
    result = PassManager(passes).run(state)
    assert result.changed and "distilled" in state.facts
    student = state.working()
    assert not torch.equal(before, student.module[0].weight)
    m = student.metrics["distill"]
    assert m["steps"] == 48 and m["method"] == "kd" and m["eval"]["agreement"] > 0.6
    ck = tmp_path / "checkpoints" / "narrow"
    assert (ck / "metrics.jsonl").exists() and sorted(p.name for p in ck.glob("step-*.pt")) == ["step-00000048.pt"]
    assert state.pipeline == [passes[0].spec()] and student.history[-1] == passes[0].spec()

    again = DistillPass(epochs=4, lr=0.01, resume=True, progress=False)(state)
    assert again.state.working().metrics["distill"]["resumed_from"] == 48


def test_distill_pass_without_data_says_how_to_give_it(teacher_data) -> None:
    state = _state(teacher_data, None)
    state.train_data = None
    with pytest.raises(InputError, match=r"--data FILE\.py:FN"):
        DistillPass()(state)
    state.calib_data = lambda: TensorBatches(teacher_data[1][:64], batch_size=32)
    assert DistillPass(progress=False)(state).changed  # calibration data is the fallback
    with pytest.raises(InputError, match="method must be one of"):
        build_pipeline("distill{method=nope}")


@pytest.mark.parametrize("method", ["ard", "rslad", "adaspec", "cema"])
def test_every_method_runs_through_the_pass(teacher_data, method: str) -> None:
    state = _state(teacher_data, None)
    options = {"method": method, "max_steps": 4, "pgd_steps": 2, "eval_pgd_steps": 2, "ref_steps": 3,
               "progress": False, "eps": 0.1, "clamp": False}
    DistillPass(**options)(state)
    m = state.working().metrics["distill"]
    assert m["steps"] == 4 and m["loss_name"] == method
    if method in {"ard", "rslad"}:
        assert set(m["robust"]) == {"clean_accuracy", "robust_accuracy"}
