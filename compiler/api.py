"""The Python API: ``potstill.compile(...)`` runs a whole compilation and returns a ``Compiled``.

    import potstill
    result = potstill.compile("examples/digits_cnn.py:teacher", out="out/api", ratios=[0.5], distill=False)
    result.students[0].name, result.students[0].latency_ms, result.students[0].path

Keyword arguments are the fields of ``potstill.plan.CompileOptions`` (the flags of
``potstill compile``); a ``PotstillError`` is raised for bad input, as the command exits 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.driver import compile_teacher
from potstill.plan import CompileOptions


@dataclass(frozen=True)
class CompiledStudent:
    """One student as the manifest records it, with the folder its files are in."""

    name: str
    path: Path
    pipeline: list[str]
    macs: int
    params: int
    latency_ms: dict[str, Any] | None
    metric: float | None
    fidelity: dict[str, Any] | None
    files: dict[str, str]
    entry: dict[str, Any]


@dataclass(frozen=True)
class Compiled:
    """What ``potstill.compile`` returns: the output folder, the students, the teacher's record
    and the whole manifest."""

    out: Path
    students: list[CompiledStudent]
    teacher: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float | None]:
        """Student name -> the user's metric (None without ``metric()``)."""
        return {s.name: s.metric for s in self.students}


def compile(
    teacher: str,
    *,
    out: str | Path,
    ratios: Sequence[float] = (),
    note: Callable[[str], None] | None = None,
    **options: Any,
) -> Compiled:
    """Compile ``teacher`` (``file.py:FACTORY`` or ``hf:DIR``) into ``out``; see the module docstring."""
    if "input_shapes" in options:
        options["input_shapes"] = tuple(options["input_shapes"])
    if "plugins" in options:
        options["plugins"] = tuple(options["plugins"])
    opts = CompileOptions(teacher=teacher, out=out, ratios=tuple(ratios), **options)
    result = compile_teacher(opts, note=note or (lambda msg: None))
    m = result.manifest
    students = [
        CompiledStudent(
            name=e["name"], path=result.out / e["dir"], pipeline=list(e["pipeline"]), macs=e["macs"],
            params=e["params"], latency_ms=e.get("latency_ms"), metric=e.get("metric"), fidelity=e.get("fidelity"),
            files=dict(e.get("files") or {}), entry=e,
        )
        for e in m.get("students", [])
    ]  # fmt: skip
    return Compiled(result.out, students, dict(m.get("teacher") or {}), m)
