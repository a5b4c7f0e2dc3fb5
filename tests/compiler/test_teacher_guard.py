"""The teacher guard: a pass that writes into the reference teacher is stopped and named; passes
that only change students (even replacing the student's tensors) pass."""

from __future__ import annotations

import copy

import pytest
import torch
from potstill.inputs.guard import TeacherGuard
from potstill.pipeline import Pass, PassError, PassManager, PassResult
from potstill.state import CompileState, Student
from torch import nn


class ScaleTeacher(Pass):
    name = "test.scale_teacher"

    def run(self, state: CompileState) -> PassResult:
        with torch.no_grad():
            state.teacher[0].weight.mul_(2.0)  # the bug the guard exists for
        return PassResult(state, True)


class ScaleStudent(Pass):
    name = "test.scale_student"

    def run(self, state: CompileState) -> PassResult:
        student = state.students[-1].module
        with torch.no_grad():
            student[0].weight.mul_(2.0)
        student[1] = nn.Linear(4, 2)  # surgery: a new module
        return PassResult(state, True)


class TrainModeForward(Pass):
    """Running the teacher in train mode updates BatchNorm statistics: an in-place write too."""

    name = "test.train_forward"

    def run(self, state: CompileState) -> PassResult:
        state.teacher.train()
        state.teacher(torch.randn(3, 4))
        state.teacher.eval()
        return PassResult(state, False)


def _state() -> CompileState:
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.BatchNorm1d(2)).eval()
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(1, 4),))
    state.students.append(Student("s", copy.deepcopy(teacher)))
    return state


def test_student_changes_pass() -> None:
    state = _state()
    before = state.teacher[0].weight.clone()
    PassManager([ScaleStudent()], [TeacherGuard()]).run(state)
    assert torch.equal(state.teacher[0].weight, before)


@pytest.mark.parametrize(("bad", "tensor"), [(ScaleTeacher, "0.weight"), (TrainModeForward, "2.num_batches_tracked")])
def test_writing_into_the_teacher_is_stopped(bad: type[Pass], tensor: str) -> None:
    with pytest.raises(PassError, match=rf"'{bad.name}' modified the reference teacher in place \(.*{tensor}"):
        PassManager([ScaleStudent(), bad()], [TeacherGuard()]).run(_state())
