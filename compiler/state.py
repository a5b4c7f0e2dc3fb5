"""The object that carries one compilation through the pipeline.

``CompileState`` holds the teacher, its example inputs, the device profile, the data handles, the
candidate students and the records that end up in the manifest. Passes read and extend it; they do
not reach into each other. ``facts`` is the set of things established so far (``"importance"``,
``"pruned"``, ``"lowered"``, ...) that passes declare in ``requires`` / ``ensures``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .ir import Analysis


@dataclass
class Student:
    """A candidate student: its module and everything measured about it."""

    name: str
    module: nn.Module
    history: list[str] = field(default_factory=list)
    #: per-group unit scores from the last importance pass, keyed by group id of ``analysis``
    importance: dict[int, Any] = field(default_factory=dict)
    #: block name -> importance score (higher = more important)
    block_importance: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    _analysis: Analysis | None = None
    _analysis_key: int | None = None

    def set_module(self, module: nn.Module, note: str) -> None:
        """Replace the module (after surgery); cached analysis and scores no longer apply."""
        self.module = module
        self.history.append(note)
        self._analysis = None
        self.importance = {}
        self.block_importance = {}


@dataclass
class CompileState:
    teacher: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    profile: Any = None  # potstill.profiles.DeviceProfile
    out_dir: Path | None = None
    #: a callable returning an iterable of batches (see potstill.data.as_batch)
    calib_data: Callable[[], Iterable[Any]] | None = None
    train_data: Callable[[], Iterable[Any]] | None = None
    eval_data: Callable[[], Iterable[Any]] | None = None
    #: metric(model) -> float, higher is better; used by depth DP and search
    metric: Callable[[nn.Module], float] | None = None
    #: Hugging Face teacher: {"path": ..., "task": ..., "auto_class": ...}
    hf: dict[str, Any] | None = None
    students: list[Student] = field(default_factory=list)
    facts: set[str] = field(default_factory=set)
    pipeline: list[str] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)
    #: dynamic batch in exported engines unless the profile fixes it
    dynamic_batch: bool = True
    seed: int = 0

    # -- the working student -----------------------------------------------------------------

    def working(self) -> Student:
        """The student the next pass transforms; a copy of the teacher if there is none yet."""
        if not self.students:
            self.students.append(Student("student", copy.deepcopy(self.teacher).eval()))
        return self.students[-1]

    def analysis(self, student: Student | None = None) -> Analysis:
        """Graph IR + coupled groups + blocks + cost of a student (cached until its module changes)."""
        from .ir import analyze

        s = student or self.working()
        key = id(s.module)
        if s._analysis is None or s._analysis_key != key:
            s._analysis = analyze(s.module, self.example_inputs, self.example_kwargs)
            s._analysis_key = key
        return s._analysis

    def teacher_analysis(self) -> Analysis:
        from .ir import analyze

        cached = self.records.get("_teacher_analysis")
        if cached is None:
            cached = analyze(self.teacher, self.example_inputs, self.example_kwargs)
            self.records["_teacher_analysis"] = cached
        return cached

    def run_model(self, model: nn.Module, *, no_grad: bool = True) -> Any:
        ctx = torch.no_grad() if no_grad else torch.enable_grad()
        with ctx:
            return model(*self.example_inputs, **self.example_kwargs)

    # -- instruments ---------------------------------------------------------------------------

    def ir_text(self) -> str:
        return self.analysis().text()

    def verify(self) -> None:
        from .verify import verify_student

        verify_student(self)
