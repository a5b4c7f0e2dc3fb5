"""Numeric health of distillation: NaN data, a NaN teacher, huge learning rates, and a teacher
shared by several students that must come out of each run as it went in."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError, NumericError
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill.pass_ import DistillPass
from potstill.state import CompileState, Student

from .conftest import mlp


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**({"epochs": 1, "lr": 1e-2, "progress": False} | kw))  # type: ignore[arg-type]


def test_nan_in_the_training_data_names_step_student_and_term(teacher_data) -> None:
    teacher, x, y = teacher_data
    x = x[:128].clone()
    x[70, 3] = float("nan")  # batch 3 of 4 (32 per batch, fixed order)
    student = mlp(8, 16, 5, seed=3)
    with pytest.raises(NumericError) as err:
        DistillTrainer(student, teacher, "kd", _cfg()).fit(
            TensorBatches(x, y[:128], batch_size=32, shuffle=False)
        )
    msg = str(err.value)
    assert "not finite at step 3" in msg and "student 'student0', loss term 'kd' = nan" in msg
    assert "the batch has NaN/inf in args[0]" in msg and "clean the training data" in msg
    # the check runs before backward: the student's weights stayed finite
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_nan_data_through_the_pass_fails_and_never_reports_success(teacher_data, tmp_path: Path) -> None:
    teacher, x, y = teacher_data
    x = x.clone()
    x[:, 0] = float("nan")
    state = CompileState(teacher, (x[:2],), train_data=TensorBatches(x[:64], y[:64], batch_size=32))
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    with pytest.raises(NumericError, match=r"step 1 \(student 'narrow', loss term 'kd' = nan\)"):
        DistillPass(progress=False)(state)
    assert "distilled" not in state.facts and "distill" not in state.working().metrics


def test_a_sum_loss_names_the_term_that_went_bad(teacher_data) -> None:
    teacher, x, _ = teacher_data
    x = x[:64].clone()
    x[0, 0] = float("inf")
    with pytest.raises(
        NumericError, match=r"loss term 'kd' = nan; student 'student0', loss term 'cosine' = nan"
    ):
        DistillTrainer(mlp(8, 16, 5, seed=3), teacher, "kd+cosine", _cfg()).fit(
            TensorBatches(x, batch_size=32)
        )


def test_nan_teacher_output_is_blamed_on_the_teacher(teacher_data) -> None:
    teacher, x, _ = teacher_data
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher[2].bias[0] = float("nan")
    with pytest.raises(NumericError, match="the teacher's output is NaN/inf"):
        DistillTrainer(mlp(8, 16, 5, seed=3), teacher, "kd", _cfg()).fit(TensorBatches(x[:64], batch_size=32))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_huge_learning_rate_is_reported_with_the_fix(teacher_data, optimizer: str) -> None:
    teacher, x, y = teacher_data
    state = CompileState(teacher, (x[:2],), train_data=TensorBatches(x[:256], y[:256], batch_size=32))
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    with pytest.raises(
        NumericError, match=r"lower (the learning rate|lr) \((lr=)?now 1e\+06|lr=1e\+06 now"
    ) as err:
        DistillPass(lr=1e6, epochs=2, optimizer=optimizer, progress=False)(state)
    assert "diverged" in str(err.value) or "NaN/inf" in str(err.value)


def test_divergence_at_the_end_and_a_recovered_spike(teacher_data) -> None:
    teacher, x, _ = teacher_data
    data = TensorBatches(x, batch_size=32)
    # lr=1: the loss spikes ~40x, then the cosine schedule brings it back below its start: not divergence
    DistillTrainer(mlp(8, 16, 5, seed=3), teacher, "kd", _cfg(epochs=3, lr=1.0)).fit(data)
    # lr=10 ends several times above its start: fails at the end (or earlier), naming the fix
    with pytest.raises(
        NumericError, match=r"diverged.*lower the learning rate \(lr=10 now; try distill\{lr=0\.001\}\)"
    ):
        DistillTrainer(
            mlp(8, 16, 5, seed=3), teacher, "kd", _cfg(epochs=3, lr=10.0, divergence_factor=2.0)
        ).fit(data)
    # the check can be switched off explicitly
    DistillTrainer(mlp(8, 16, 5, seed=3), teacher, "kd", _cfg(epochs=1, lr=10.0, divergence_factor=None)).fit(
        data
    )


def _flags(module: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    return [p.requires_grad for p in module.parameters()], [m.training for m in module.modules()]


def test_shared_teacher_is_restored_and_a_second_student_trains(teacher_data) -> None:
    teacher, x, y = teacher_data
    teacher.train()
    teacher[0].requires_grad_(False)  # a user's partly frozen teacher in train mode: kept exactly
    before = _flags(teacher)
    weights = copy.deepcopy(teacher.state_dict())
    data = TensorBatches(x[:128], y[:128], batch_size=32)
    first = copy.deepcopy(teacher)  # what the driver does for each student of a family
    first.requires_grad_(True)
    DistillTrainer(first, teacher, "kd", _cfg()).fit(data)
    assert _flags(teacher) == before
    second = copy.deepcopy(teacher)  # made after the first run: must still be trainable
    second.requires_grad_(True)
    DistillTrainer(second, teacher, "kd", _cfg()).fit(data)
    assert _flags(teacher) == before
    torch.testing.assert_close(teacher.state_dict(), weights, rtol=0, atol=0)
    # restored on failure too
    bad = x[:64].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericError):
        DistillTrainer(copy.deepcopy(first), teacher, "kd", _cfg()).fit(TensorBatches(bad, batch_size=32))
    assert _flags(teacher) == before


def test_frozen_or_shared_students_are_input_errors(teacher_data) -> None:
    teacher, x, _ = teacher_data
    frozen = mlp(8, 16, 5, seed=3).requires_grad_(False)
    with pytest.raises(InputError, match="student 'student0' has no trainable parameters"):
        DistillTrainer(frozen, teacher, "kd", _cfg()).fit(TensorBatches(x[:64], batch_size=32))
    with pytest.raises(InputError, match="shares parameters with the teacher"):
        DistillTrainer(teacher, teacher, "kd", _cfg()).fit(TensorBatches(x[:64], batch_size=32))
    assert all(p.requires_grad for p in teacher.parameters())


FAMILY_TEACHER = """
import torch
from torch import nn


def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()


def example_inputs():
    return (torch.randn(1, 1, 8, 8),)


def train_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
"""


def test_family_of_two_distilled_students_through_the_cli(tmp_path: Path) -> None:
    """``potstill compile T --ratio 0.3 --ratio 0.5 --distill-epochs 1`` used to crash on the second
    student ("optimizer got an empty parameter list"): the first run froze the shared teacher."""
    import json

    from potstill.cli import main

    (tmp_path / "family.py").write_text(FAMILY_TEACHER)
    out = tmp_path / "out"
    argv = ["compile", f"{tmp_path / 'family.py'}:teacher", "--ratio", "0.3", "--ratio", "0.5",
            "--distill-epochs", "1", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    students = json.loads((out / "manifest.json").read_text())["students"]
    assert len(students) == 2
    for s in students:
        # 3 batches of train_data calibrate too: the held-out one is never trained on, 2 train
        assert s["metrics"]["distill"]["method"] == "kd" and s["metrics"]["distill"]["steps"] == 2
    assert not list(out.rglob("step-*")) and not list(out.rglob("*.safetensors.tmp")), "no checkpoints in OUT"
