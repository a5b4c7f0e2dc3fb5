"""The default pipeline distils on whatever data the user gave, without labels, under ``--train-minutes``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from potstill.cli import main
from potstill.driver import Prepared, prepare
from potstill.errors import InputError
from potstill.inputs.data import as_batch
from potstill.passes.distill.teacher_cache import batch_key
from potstill.plan import CompileOptions

TEACHER = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()

def example_inputs():
    return (torch.zeros(1, 3, 8, 8),)
"""

TRAIN = """
def train_data():
    g = torch.Generator().manual_seed(1)
    for _ in range(12):  # unlabelled: images only
        yield torch.randn(4, 3, 8, 8, generator=g)
"""


def _file(tmp_path: Path, extra: str = TRAIN) -> str:
    path = tmp_path / "t.py"
    path.write_text(textwrap.dedent(TEACHER) + textwrap.dedent(extra))
    return f"{path}:teacher"


def _prepare(tmp_path: Path, extra: str = TRAIN, **kw: Any) -> tuple[Prepared, list[str]]:
    said: list[str] = []
    opts = CompileOptions(teacher=_file(tmp_path, extra), out=str(tmp_path / "out"), profile="cpu",
                          teacher_timing=False, **kw)  # fmt: skip
    return prepare(opts, note=said.append), said


def test_train_minutes_puts_a_budget_on_the_default_distillation(tmp_path: Path) -> None:
    p, said = _prepare(tmp_path, train_minutes=2.5)
    (plan,) = p.plans
    assert "fidelity{stage=before_distill},distill{minutes=2.5,lr_probe=[0.001,0.00025,6.25e-05]}" in plan.spec  # images: augmented, teacher live
    assert any("without labels" in s and "at most 2.5 min" in s for s in said)


def test_training_never_sees_the_held_out_batches(tmp_path: Path) -> None:
    p, _ = _prepare(tmp_path)
    held = {batch_key(b) for b in map(as_batch, p.state.heldout_data())}
    trained = [batch_key(as_batch(b)) for b in p.state.train_data()]
    assert held and len(trained) == 12 - len(held) and not held & set(trained)


@pytest.mark.parametrize(("kw", "message"), [
    ({"train_minutes": 0.0}, "positive number of minutes"),
    ({"train_minutes": float("nan")}, "positive number of minutes"),
    ({"train_minutes": 1.0, "distill": False}, "--no-distill turns distillation off"),
    ({"train_minutes": 1.0, "pipeline": "prune.width{ratio=0.5}"}, "distill{minutes=M}"),
    ({"augment": False, "distill": False}, "--no-augment"),
])  # fmt: skip
def test_budget_flags_that_cannot_apply_are_errors(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        _prepare(tmp_path, **kw)


def test_no_training_data_means_no_budget(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no training data to distil on, so no training would run"):
        _prepare(tmp_path, extra="", train_minutes=1.0)


def test_a_calib_image_folder_is_distilled_on(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"p{i}.png")
    p, said = _prepare(tmp_path, extra="", calib=str(folder))
    (plan,) = p.plans
    assert "distill{epochs=3,lr_probe=[0.001,0.00025,6.25e-05]}" in plan.spec and p.state.train_data is None  # the pass reads calib_data
    assert any(f"--calib {folder} (its calibration part)" in s for s in said)
    p, _ = _prepare(tmp_path, extra="", calib=str(folder), augment=False)
    assert "distill{epochs=3,lr_probe=[0.001,0.00025,6.25e-05],teacher_outputs=cached,augment=False}" in p.plans[0].spec


def test_the_manifest_says_the_budget_stopped_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["compile", _file(tmp_path), "--ratio", "0.5", "--distill-epochs", "50", "--train-minutes", "0.0005",
                 "--no-teacher-timing", "-q", "-o", str(out)])  # fmt: skip
    assert code == 0
    (student,) = json.loads((out / "manifest.json").read_text())["students"]
    d = student["metrics"]["distill"]
    assert d["stopped_by_budget"] is True and d["budget_minutes"] == 0.0005
    assert 1 <= d["steps"] < 50 * 9 == d["planned_steps"]  # 9 of the 12 batches train: 3 are held out
    assert "fidelity_before_distill" in student["metrics"] and "⏱" in capsys.readouterr().out
