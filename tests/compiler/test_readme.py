"""The README's Python snippets run as written and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest
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


def test_the_readme_has_python_snippets() -> None:
    assert len(snippets()) >= 2


@pytest.mark.parametrize("index", range(2))
def test_readme_snippet_runs_and_prints_what_it_says(
    index: int, registry: dict[str, type[Pass]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, expected = snippets()[index]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # a real module: dataclasses (and pickling) look a class's module up in sys.modules
        module = types.ModuleType("__readme__")
        monkeypatch.setitem(sys.modules, "__readme__", module)
        exec(compile(code, f"README.md snippet {index}", "exec"), module.__dict__)
    if expected is not None:
        assert out.getvalue() == expected
