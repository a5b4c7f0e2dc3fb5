"""Compile flags for large teachers: the memory estimate is printed and enforced before loading,
``--no-teacher-timing`` skips the teacher's engine and says so, and a rerun reuses the teacher's
record while it rebuilds changed students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from potstill.cli import main
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = f"{REPO / 'examples' / 'digits_cnn.py'}:teacher"


def test_max_memory_refuses_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # never read: the refusal comes first
    save_file({"w": torch.zeros(1000, 1000)}, str(hf / "model.safetensors"))
    assert main(["compile", f"hf:{hf}", "--max-memory", "100M", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "estimated peak memory" in err and "exceeds --max-memory (0.1 GB)" in err
    assert "loading teacher" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses the flag itself, with exit code 2
        main(["compile", EXAMPLE, "--max-memory", "lots", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "give a size such as 12G" in capsys.readouterr().err


def test_no_teacher_timing_then_rerun_reuses_the_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["compile", EXAMPLE, "--no-distill", "--ratio", "0.5", "-o", str(out)]
    assert main([*args, "-q", "--no-teacher-timing"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["latency_ms"] is None and manifest["teacher"]["parity"] is None
    assert manifest["students"][0]["speedup"] is None
    assert manifest["students"][0]["latency_ms"]["median"] > 0  # students are still lowered and timed
    capsys.readouterr()
    # timing asked for now: the earlier record has none, so the teacher is lowered this time
    assert main(args) == 0
    timed = json.loads((out / "manifest.json").read_text())["teacher"]
    assert timed["latency_ms"]["median"] > 0 and timed["latency_method"]["max_runs"] == 200
    # another student: it is built, the teacher's record (and its engine timing) is reused
    capsys.readouterr()
    assert main(["compile", EXAMPLE, "--no-distill", "--ratio", "0.25", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "teacher: unchanged since the last run" in err and "timing the teacher" not in err
    assert json.loads((out / "manifest.json").read_text())["teacher"]["latency_ms"] == timed["latency_ms"]
