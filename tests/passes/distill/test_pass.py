from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError, PassError
from potstill.passes.distill import TensorBatches
from potstill.passes.distill.pass_ import DistillPass
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student

from .conftest import mlp


def _state(teacher_data, tmp_path: Path | None, labelled: bool = True) -> CompileState:
    teacher, x, y = teacher_data
    train = TensorBatches(x[:384], y[:384], batch_size=32) if labelled else TensorBatches(x[:384], batch_size=32)
    test = TensorBatches(x[384:], y[384:], batch_size=128, shuffle=False)
    state = CompileState(teacher, (x[:2],), out_dir=None if tmp_path is None else tmp_path / "out",
                         train_data=train, eval_data=test)
    state.work_dir = tmp_path  # the driver's per-OUT work area
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    return state


def test_distill_pass_from_a_pipeline_string(teacher_data, tmp_path: Path) -> None:
    state = _state(teacher_data, tmp_path)
    passes = build_pipeline("distill{method=kd,epochs=4,lr=0.01,temperature=2,progress=false,checkpoint_every=10}")
    assert passes[0].spec() == "distill{epochs=4,lr=0.01,checkpoint_every=10,progress=False,temperature=2.0}"
    before = state.working().module[0].weight.clone()
    result = PassManager(passes).run(state)
    assert result.changed and "distilled" in state.facts
    student = state.working()
    assert not torch.equal(before, student.module[0].weight)
    m = student.metrics["distill"]
    assert m["steps"] == 48 and m["method"] == "kd" and m["eval"]["agreement"] > 0.6
    assert m["options"] == {"temperature": 2.0, "alpha": 1.0}  # what ran, defaults filled in
    ck = tmp_path / "checkpoints" / "narrow"
    assert m["checkpoints"] == str(ck)
    assert (ck / "metrics.jsonl").exists() and sorted(p.name for p in ck.glob("step-*")) == ["step-00000048"]
    assert not (tmp_path / "out").exists(), "checkpoints stay out of the students' folders"
    assert state.pipeline == [passes[0].spec()] and student.history[-1] == passes[0].spec()

    # a re-run of the same compile (same student, data and settings) resumes from the checkpoint
    options = {"epochs": 4, "lr": 0.01, "temperature": 2, "checkpoint_every": 10, "progress": False}
    rerun = _state(teacher_data, tmp_path)
    DistillPass(**options)(rerun)
    assert rerun.working().metrics["distill"]["resumed_from"] == 48
    torch.testing.assert_close(rerun.working().module.state_dict(), student.module.state_dict(), rtol=0, atol=0)

    # other settings: the old checkpoint does not apply; it is dropped and training starts afresh
    other = _state(teacher_data, tmp_path)
    m = DistillPass(**(options | {"temperature": 3}))(other).state.working().metrics["distill"]
    assert m["resumed_from"] is None and "other settings" in m["checkpoint_discarded"]
    # resume=false: never resume
    fresh = _state(teacher_data, tmp_path)
    assert DistillPass(**(options | {"temperature": 3}), resume=False)(fresh).state.working().metrics["distill"][
        "resumed_from"] is None


def test_distill_pass_without_data_says_how_to_give_it(teacher_data) -> None:
    state = _state(teacher_data, None)
    state.train_data = None
    with pytest.raises(InputError, match=r"--data FILE\.py:FN"):
        DistillPass()(state)
    state.calib_data = lambda: TensorBatches(teacher_data[1][:64], batch_size=32)
    assert DistillPass(progress=False)(state).changed  # calibration data is the fallback
    with pytest.raises(InputError, match="unknown method 'nope'"):
        build_pipeline("distill{method=nope}")


@pytest.mark.parametrize("method", ["ard", "rslad", "adaspec", "cema"])
def test_every_method_runs_through_the_pass(teacher_data, method: str) -> None:
    state = _state(teacher_data, None)
    own = {"ard": {"pgd_steps": 2, "eval_pgd_steps": 2, "eps": 0.1, "clamp": False},
           "rslad": {"pgd_steps": 2, "eval_pgd_steps": 2, "eps": 0.1, "clamp": False},
           "adaspec": {"ref_steps": 3}, "cema": {"entropy_fraction": 0.5}}[method]
    DistillPass(method=method, max_steps=4, progress=False, **own)(state)
    m = state.working().metrics["distill"]
    assert m["steps"] == 4 and m["method"] == method
    assert all(m["options"][k] == v for k, v in own.items())
    if method in {"ard", "rslad"}:
        assert set(m["robust"]) == {"clean_accuracy", "robust_accuracy"}


def test_training_that_raises_the_heldout_loss_is_rejected(teacher_data, tmp_path: Path) -> None:
    """check (default): the student before training is put back when training raised the loss on
    the held-out batches; a run that lowers it is kept; check=false keeps either; check=true needs
    held-out batches."""
    x = teacher_data[1]
    held = [x[448:]]

    def run(options: str, heldout: bool = True) -> tuple[Student, torch.Tensor]:
        state = _state(teacher_data, None)
        state.heldout_data = (lambda: iter(held)) if heldout else None
        before = state.working().module[0].weight.clone()
        PassManager(build_pipeline(f"distill{{progress=false,{options}}}")).run(state)
        return state.working(), before

    # sgd at lr=50 without a divergence check: the weights blow up, the held-out loss rises
    wild = "optimizer=sgd,lr=50,max_steps=3,grad_clip=null,divergence_factor=null"
    student, before = run(wild)
    h = student.metrics["distill"]["heldout"]
    assert h["kept"] is False and not h["loss_after"] < h["loss_before"]
    assert torch.equal(student.module[0].weight, before) and "rejected" in student.history[-2]
    student, before = run(f"{wild},check=false")
    assert "heldout" not in student.metrics["distill"] and not torch.equal(student.module[0].weight, before)

    student, before = run("epochs=2,lr=0.01")  # ordinary distillation lowers it and is kept
    h = student.metrics["distill"]["heldout"]
    assert h["kept"] is True and h["loss_after"] < h["loss_before"]
    assert not torch.equal(student.module[0].weight, before)

    with pytest.raises(PassError, match=r"check=true.*no held-out batches"):
        run("max_steps=1,check=true", heldout=False)
    student, _ = run("max_steps=1", heldout=False)  # None: nothing to check on, nothing checked
    assert "heldout" not in student.metrics["distill"]
