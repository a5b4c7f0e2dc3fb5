"""End to end: every student's fidelity is measured on held-out data, and a broken one is flagged."""

from __future__ import annotations

import textwrap
from pathlib import Path

import potstill
import pytest
from potstill.outputs.report import below_floor
from potstill.pipeline import Pass

TEACHER = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()

def example_inputs():
    return (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)

def calib_data():
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        yield torch.randn(4, 3, 8, 8, generator=g)
"""

BREAK = """
from potstill.pipeline import function_pass
import torch

@function_pass("test.zero_weights")
def zero_weights(state, opts):
    with torch.no_grad():
        for p in state.working().module.parameters():
            p.zero_()
    return True
"""


@pytest.mark.slow
def test_broken_student_is_flagged_and_a_copy_is_not(
    tmp_path: Path, registry: dict[str, type[Pass]], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiny.py").write_text(textwrap.dedent(TEACHER))
    (tmp_path / "breaker.py").write_text(textwrap.dedent(BREAK))
    notes: list[str] = []
    result = potstill.compile(f"{tmp_path / 'tiny.py'}:teacher", out=tmp_path / "out", profile="cpu",
                              pipeline="test.zero_weights", plugins=[str(tmp_path / "breaker.py")],
                              note=notes.append)  # fmt: skip
    (s,) = result.students
    assert s.fidelity is not None and s.fidelity["task"] == "classification"
    assert s.fidelity["n"] == 8  # the held-out quarter: 2 of 8 batches of 4, never used to calibrate
    assert s.fidelity["score"] < 0.8
    assert result.manifest["inputs"]["calib"]["heldout_batches"] == 2
    assert any("student student: fidelity" in n and "below the floor 0.8" in n for n in notes)
    report = (result.out / "report.md").read_text()
    assert "> **⚠ student student: fidelity" in report

    copy_notes: list[str] = []
    same = potstill.compile(f"{tmp_path / 'tiny.py'}:teacher", out=tmp_path / "out2", profile="cpu",
                            pipeline="bn.recalibrate", min_fidelity=0.5, note=copy_notes.append)  # fmt: skip
    (s,) = same.students
    assert s.fidelity is not None and s.fidelity["score"] == 1.0  # an unchanged copy agrees everywhere
    assert not below_floor(same.manifest["students"][0], 0.5)
    assert not [n for n in copy_notes if "below the floor" in n]  # the copy is not flagged
    assert "⚠ student" not in (same.out / "report.md").read_text()
    assert same.manifest["profile"]["min_fidelity"] == 0.5
