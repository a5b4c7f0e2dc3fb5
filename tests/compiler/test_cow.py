"""Copy-on-write students (``potstill.ir.cow``): a student shares the teacher's tensors until a pass
that writes in place runs; surgery slices into new tensors with counters of their own; nothing a
student does reaches the teacher."""

from __future__ import annotations

import torch
from potstill.inputs.guard import TeacherGuard, tensor_versions
from potstill.ir.capture import analyze
from potstill.ir.cow import TensorSlots, shared_copy, shares_storage, unshare
from potstill.ir.surgery import prune_width
from potstill.pipeline import Pass, PassManager, PassResult
from potstill.state import CompileState
from torch import nn


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


class Train(Pass):
    """Writes the student's weights in place (as training does); ``in_place`` is the default."""

    name = "test.cow_train"

    def run(self, state: CompileState) -> PassResult:
        with torch.no_grad():
            for p in state.students[-1].module.parameters():
                p.mul_(0.5)
        return PassResult(state, True)


def test_shared_copy_keeps_ties_and_flags() -> None:
    emb = nn.Embedding(10, 4)
    model = nn.ModuleDict({"emb": emb, "head": nn.Linear(4, 10, bias=False)})
    model["head"].weight = emb.weight  # tied
    emb.weight.requires_grad_(False)
    copy_ = shared_copy(model)
    assert copy_["head"].weight is copy_["emb"].weight and copy_["emb"].weight is not emb.weight
    assert copy_["emb"].weight.data_ptr() == emb.weight.data_ptr() and not copy_["emb"].weight.requires_grad
    assert unshare(copy_, model) == 10 * 4 * 4  # the tied tensor is copied once
    assert copy_["head"].weight is copy_["emb"].weight and not shares_storage(copy_, model)


def test_pruned_student_owns_what_it_sliced() -> None:
    teacher = _teacher()
    a = analyze(teacher, (torch.randn(1, 3, 8, 8),))
    group = next(g for g in a.prunable() if g.n_units == 8)
    student = prune_width(teacher, a, {group.id: [0, 2, 4, 6]})
    assert student[0].weight.shape[0] == 4
    # the untouched output conv's bias is shared; the sliced tensors are not
    assert student[3].bias.data_ptr() == teacher[3].bias.data_ptr()
    assert student[0].weight.data_ptr() != teacher[0].weight.data_ptr()
    before = tensor_versions(teacher)
    with torch.no_grad():
        student[0].weight.add_(1.0)  # training the sliced tensor is not a write into the teacher
    assert tensor_versions(teacher) == before


def test_in_place_pass_unshares_first_and_teacher_is_untouched() -> None:
    teacher = _teacher()
    state = CompileState.from_teacher(teacher, (torch.randn(2, 3, 8, 8),), profile=None)
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    state.students.append(state.new_student("s", share=True))
    assert shares_storage(state.students[0].module, teacher)
    assert state.analysis(state.students[0]) is state.teacher_analysis()  # an unchanged copy: no re-capture
    PassManager([Train()], [TeacherGuard()]).run(state)  # the guard would raise on a shared write
    assert not shares_storage(state.students[0].module, teacher)
    assert all(torch.equal(v, reference[k]) for k, v in teacher.state_dict().items())
    assert torch.allclose(state.students[0].module[0].weight, 0.5 * teacher[0].weight)


def test_bn_recalibrate_on_a_shared_student_leaves_the_teacher() -> None:
    from potstill.passes.prune.bn_recalibrate import recalibrate_batchnorm

    teacher = _teacher()
    student = shared_copy(teacher)
    before = teacher[1].running_mean.clone()
    used, updated = recalibrate_batchnorm(student, [torch.randn(4, 3, 8, 8) * 3 + 1])
    assert (used, updated) == (1, 1)
    assert torch.equal(teacher[1].running_mean, before)
    assert not torch.equal(student[1].running_mean, before)


def test_slots_swap_every_holder() -> None:
    lin = nn.Linear(2, 2)
    outer = nn.Sequential(lin, lin)  # the same module twice
    slots = TensorSlots(outer)
    new = slots.replace(lin.weight, torch.zeros(2, 2))
    assert isinstance(new, nn.Parameter) and outer[0].weight is new and outer[1].weight is new
