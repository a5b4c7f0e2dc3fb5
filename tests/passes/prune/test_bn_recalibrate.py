"""bn.recalibrate: fresh BatchNorm statistics from calibration data, nothing else touched."""

from __future__ import annotations

import copy

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.prune.bn_recalibrate import BNRecalibrateOptions, recalibrate_batchnorm
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student
from torch import nn


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).eval()  # fmt: skip


def batches(n: int = 4, shift: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 6, 6, generator=g) * 3 + shift for _ in range(n)]


def test_running_statistics_are_the_cumulative_batch_averages():
    model, data = conv_bn(), batches()
    used, updated = recalibrate_batchnorm(model, data)
    assert (used, updated) == (4, 2)
    with torch.no_grad():
        acts = [model[0](x) for x in data]
    means = torch.stack([a.mean((0, 2, 3)) for a in acts])
    vars_ = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts])
    torch.testing.assert_close(model[1].running_mean, means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, vars_.mean(0), rtol=1e-5, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 4
    assert model[1].momentum == 0.1  # restored
    assert not model.training and not any(m.training for m in model.modules())


def test_only_running_statistics_change():
    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_batchnorm(model, batches())
    after = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(stats) for k in changed)
    for k, value in before.items():
        if not k.endswith(stats):
            assert torch.equal(value, after[k]), k  # bit-identical


def test_layers_no_batch_reaches_keep_their_statistics():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
            with torch.no_grad():
                self.unused.running_mean.fill_(3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    m = Skip().eval()
    used, updated = recalibrate_batchnorm(m, [torch.randn(8, 4)])
    assert (used, updated) == (1, 1)
    assert torch.equal(m.unused.running_mean, torch.full((4,), 3.0))
    assert int(m.unused.num_batches_tracked) == 0


def test_recalibration_repairs_a_model_whose_input_statistics_moved():
    """Halving a conv's output (as pruning its inputs does) breaks BN; re-estimation restores it."""
    teacher = conv_bn()
    data = batches(6)
    recalibrate_batchnorm(teacher, data)  # teacher with statistics that fit the data
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)
        student[0].bias.mul_(0.5)
    x = torch.cat(data)
    with torch.no_grad():
        err_before = (student(x) - teacher(x)).abs().mean()
        recalibrate_batchnorm(student, data)
        err_after = (student(x) - teacher(x)).abs().mean()
    # conv output halved, BN renormalises it: the result matches up to the eps inside the sqrt
    assert err_after < 1e-3 < err_before


def test_bad_batches_restore_the_statistics_and_name_the_pass():
    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"bn\.recalibrate"):
        recalibrate_batchnorm(model, [torch.randn(2, 5, 6, 6)])
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def _state(model: nn.Module, calib: list[torch.Tensor] | None) -> CompileState:
    state = CompileState(teacher=model, example_inputs=(torch.randn(1, 3, 6, 6),),
                         calib_data=(lambda: iter(calib)) if calib is not None else None)  # fmt: skip
    state.students.append(Student("s", copy.deepcopy(model)))
    return state


def test_pass_uses_calib_data_and_records_what_it_did():
    state = _state(conv_bn(), batches(3))
    passes = build_pipeline("bn.recalibrate{batches=2}")
    result = PassManager(passes).run(state)
    assert result.changed
    s = result.state.students[0]
    assert int(s.module[1].num_batches_tracked) == 2
    assert s.metrics["bn_recalibrate"] == {"layers": 2, "of": 2, "batches": 2}
    assert result.state.pipeline == ["bn.recalibrate{batches=2}"]


def test_pass_is_a_noted_no_op_without_batchnorm_or_without_data(capsys: pytest.CaptureFixture[str]):
    mlp = nn.Sequential(nn.Linear(3, 3)).eval()
    state = _state(mlp, [torch.randn(2, 3)])
    assert not PassManager(build_pipeline("bn.recalibrate")).run(state).changed
    assert "no BatchNorm" in capsys.readouterr().err
    state = _state(conv_bn(), None)
    before = copy.deepcopy(state.students[0].module.state_dict())
    assert not PassManager(build_pipeline("bn.recalibrate")).run(state).changed
    err = capsys.readouterr().err
    assert "no calibration data" in err and "--calib" in err
    for k, v in state.students[0].module.state_dict().items():
        assert torch.equal(before[k], v)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_options_are_checked(bad: object):
    with pytest.raises(ValueError, match="batches"):
        BNRecalibrateOptions(batches=bad)  # type: ignore[arg-type]


def test_statistics_that_raise_the_heldout_loss_are_rejected():
    """Calibration data unlike what the teacher saw (shifted by +2) would move the unpruned teacher's
    statistics away from its own; held-out data from the teacher's distribution rejects that."""
    teacher = conv_bn()
    recalibrate_batchnorm(teacher, batches(6, shift=0.0))
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(1, 3, 6, 6),),
                         calib_data=lambda: iter(batches(3, shift=2.0)),
                         heldout_data=lambda: iter(batches(2, shift=0.0)))  # fmt: skip
    state.students.append(Student("s", copy.deepcopy(teacher)))
    before = copy.deepcopy(state.students[0].module.state_dict())
    assert not PassManager(build_pipeline("bn.recalibrate")).run(state).changed
    rec = state.students[0].metrics["bn_recalibrate"]
    assert rec["kept"] is False and rec["heldout_loss_after"] > rec["heldout_loss_before"]
    for k, v in state.students[0].module.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(before[k], v), k
    # check=false keeps them whatever the held-out data say
    assert PassManager(build_pipeline("bn.recalibrate{check=false}")).run(state).changed
    assert not torch.equal(before["1.running_mean"], state.students[0].module[1].running_mean)


def test_statistics_that_lower_the_heldout_loss_are_kept():
    teacher = conv_bn()
    data = batches(6)
    recalibrate_batchnorm(teacher, data)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)
        student[0].bias.mul_(0.5)
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(1, 3, 6, 6),),
                         calib_data=lambda: iter(data[:4]), heldout_data=lambda: iter(data[4:]))  # fmt: skip
    state.students.append(Student("s", student))
    assert PassManager(build_pipeline("bn.recalibrate")).run(state).changed
    rec = state.students[0].metrics["bn_recalibrate"]
    assert rec["kept"] is True and rec["heldout_loss_after"] < rec["heldout_loss_before"]
