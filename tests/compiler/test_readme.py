"""The README's Python snippets run as written, and what they print is checked against what the run
did (the manifest, the reloaded student, the pass acting again), not only against the pasted text."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from potstill.pipeline import Pass

REPO = Path(__file__).resolve().parents[2]


def snippets() -> list[tuple[str, str | None]]:
    """Each ```python block with the ```text block that follows it after 'prints' (if any)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"```python\n(.*?)```(.*?)(?=```python|\Z)", text, re.S):
        printed = re.match(r"\s*prints\s*```text\n(.*?)```", m.group(2), re.S)
        found.append((m.group(1), printed.group(1) if printed else None))
    return found


def run_snippet(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, types.ModuleType]:
    """Run README snippet ``index`` in ``tmp_path`` (with the examples beside it); (stdout, its namespace)."""
    code, _ = snippets()[index]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    # a real module: dataclasses (and pickling) look a class's module up in sys.modules
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, "__readme__", module)
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md snippet {index}", "exec"), module.__dict__)
    return out.getvalue(), module


def test_the_readme_has_python_snippets() -> None:
    assert len(snippets()) >= 2


def _fields(line: str) -> tuple[str, list[str], int, int, float]:
    """``macs50 ['a', 'b'] 10012128 97946 1.0`` -> its five fields."""
    m = re.fullmatch(r"(\S+) (\[.*\]) (\d+) (\d+) ([0-9.]+)", line.strip())
    assert m, f"not a student line: {line!r}"
    return m.group(1), ast.literal_eval(m.group(2)), int(m.group(3)), int(m.group(4)), float(m.group(5))


def test_compile_snippet_prints_the_run_and_the_prose_states_what_the_numbers_are(
    registry: dict[str, type[Pass]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from potstill.inputs.data import load_callable
    from potstill.outputs.students_io import load_student

    printed, _ = run_snippet(0, tmp_path, monkeypatch)
    name, pipeline, macs, params, fidelity = _fields(printed)
    manifest: dict[str, Any] = json.loads((tmp_path / "out" / "readme" / "manifest.json").read_text())
    (s,) = manifest["students"]
    assert (name, pipeline, macs, params) == (s["name"], s["pipeline"], s["macs"], s["params"])
    assert name == "macs50" and pipeline[0] == "prune.width{ratio=0.5}"  # --ratio 0.5, --no-distill
    assert "distill" not in " ".join(pipeline)
    assert 0.45 <= macs / manifest["teacher"]["macs"] <= 0.55  # "half the MACs"
    student = load_student(tmp_path / "out" / "readme" / s["dir"],
                           factory=load_callable(f"{REPO / 'examples' / 'digits_cnn.py'}:teacher"))  # fmt: skip
    assert sum(p.numel() for p in student.parameters()) == params  # the count is the saved student's
    # the prose: "the last number is ... its top-1 agreement with the teacher on the held-out batches"
    measures = s["fidelity"]["measures"]
    assert fidelity == round(measures["top1_agreement"], 2) == round(s["fidelity"]["score"], 2)
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"keep it at {fidelity} on those digits" in readme
    _, expected = snippets()[0]
    assert expected is not None and _fields(expected) == (name, pipeline, macs, params, fidelity)


def test_custom_pass_snippet_runs_the_pass_it_defines(
    registry: dict[str, type[Pass]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from potstill.pipeline import PassManager, build_pipeline

    printed, module = run_snippet(1, tmp_path, monkeypatch)
    state = module.result.state
    assert printed == f"{state.pipeline}\n"
    _, expected = snippets()[1]
    assert printed == expected
    assert state.pipeline == ["importance.magnitude", "prune.width{ratio=0.5}", "my.scale_head{factor=0.9}"]
    student = state.working()
    assert student.module.head.weight.shape[1] < module.teacher.head.weight.shape[1]  # pruned before the head
    # the pass does what its docstring says: run again with factor 2, the head's weights double
    before = student.module.head.weight.detach().clone()
    again = PassManager(build_pipeline("my.scale_head{factor=2.0}"), []).run(state).state
    torch.testing.assert_close(again.working().module.head.weight.detach(), 2 * before)
