"""The object that carries one compilation through the pipeline.

``CompileState`` holds the teacher, its example inputs, the device profile, the data handles, the
candidate students and the records that end up in the manifest. Passes read and extend it; they do
not reach into each other. ``facts`` is the set of things established so far (``"importance"``,
``"pruned"``, ``"lowered"``, ...); passes state what they need and give as predicates on the state
(``requires`` / ``ensures``, see ``potstill.pipeline``).

Build one from a module with ``CompileState.from_teacher``::

    state = CompileState.from_teacher(model, (torch.randn(1, 3, 32, 32),), profile="cpu")
    state.students.append(state.new_student("macs50"))

Several states (one per planned student) ``fork`` one ``TeacherCache``: the teacher's analysis,
its metric and its requires-grad flags are computed once, and every student is a fresh copy of
the one reference teacher, which no pass may change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from potstill.ir.cow import shared_copy, unshare
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis


@dataclass
class Student:
    """A candidate student: its module and everything measured about it.

    ``history``: the passes that ran on it (appended by the ``PassManager``) and the notes of
    surgery (``set_module``).
    """

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
    #: ``id`` of the module while it is an unchanged copy of the teacher (it has the teacher's analysis)
    _teacher_copy: int | None = None

    def set_module(self, module: nn.Module, note: str) -> None:
        """Replace the module (after surgery); cached analysis and scores no longer apply."""
        self.module = module
        self.history.append(note)
        self._analysis = None
        self._teacher_copy = None
        self.importance = {}
        self.block_importance = {}


@dataclass
class TeacherCache:
    """What every state of one compilation shares about the teacher (computed once).

    ``requires_grad`` is the teacher's flags as loaded, so a student copied after a trainer froze
    the teacher still trains (and the teacher is put back as it was).
    """

    analysis: Analysis | None = None
    metric: float | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)
    #: the teacher's engine record, written by the ``record.teacher`` pass
    record: dict[str, Any] = field(default_factory=dict)
    #: the teacher's lowered engine (``potstill.targets.Artifact``), written by ``record.teacher``:
    #: each student's engine is timed interleaved with it
    engine: Any = None
    #: what a pass builds once for every plan of the compilation (an elastic supernet), by key
    passes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileState:
    teacher: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    profile: Any = None  # potstill.profiles.DeviceProfile
    out_dir: Path | None = None
    #: a callable returning an iterable of batches (see potstill.inputs.data.as_batch); importance,
    #: reconstruction and BatchNorm statistics use it
    calib_data: Callable[[], Iterable[Any]] | None = None
    #: batches never seen by importance, reconstruction or BN statistics: fidelity is measured on them
    heldout_data: Callable[[], Iterable[Any]] | None = None
    train_data: Callable[[], Iterable[Any]] | None = None
    eval_data: Callable[[], Iterable[Any]] | None = None
    #: metric(model) -> float, higher is better; used by depth DP, search and the record pass
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
    #: a stable per-OUT work area that survives a killed run (distillation checkpoints live here)
    work_dir: Path | None = None
    #: how the teacher was given (``hf:PATH`` or ``file.py:FACTORY``); the reload record is written
    #: (and checked with this factory) from it, so a teacher given as a bare module gets no record
    teacher_spec: str | None = None
    #: the teacher's analysis, metric and flags, shared by the states of one compilation
    shared: TeacherCache = field(default_factory=TeacherCache)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_teacher(
        cls,
        teacher: nn.Module,
        example_inputs: tuple[Any, ...] | list[Any],
        *,
        profile: Any = "cpu",
        **fields: Any,
    ) -> CompileState:
        """A state for ``teacher`` (put in eval mode) with its example inputs and a profile
        (a ``DeviceProfile``, a built-in name or a YAML path); other fields by keyword.

        >>> state = CompileState.from_teacher(torch.nn.Linear(4, 2), (torch.randn(2, 4),))
        >>> state.profile.name, state.dynamic_batch
        ('cpu', True)
        """
        from potstill.profiles import load_profile

        prof = load_profile(profile) if profile is not None else None
        fields.setdefault("dynamic_batch", getattr(prof, "batch", None) is None)
        state = cls(teacher=teacher.eval(), example_inputs=tuple(example_inputs), profile=prof, **fields)
        state.shared.requires_grad = {n: p.requires_grad for n, p in teacher.named_parameters()}
        return state

    def fork(self, **changes: Any) -> CompileState:
        """A fresh state for another student: same teacher, data and shared cache; no students,
        facts, pipeline or records of its own."""
        base: dict[str, Any] = {"students": [], "facts": set(), "pipeline": [], "records": {}}
        return replace(self, **{**base, **changes})

    def new_student(self, name: str, *, share: bool = False) -> Student:
        """A fresh copy of the reference teacher (in eval mode, its original requires-grad flags).

        ``share=True``: the copy shares the teacher's tensors (``potstill.ir.cow``) until a pass that
        writes in place runs (``Pass.in_place``: the pass first gives each student its own copy of
        what it still shares). Code that changes a student outside passes wants the default, a deep
        copy."""
        module = (shared_copy(self.teacher) if share else copy.deepcopy(self.teacher)).eval()
        flags = self.shared.requires_grad
        if flags:
            for pname, p in module.named_parameters():
                p.requires_grad_(flags.get(pname, True))
        return Student(name, module, _teacher_copy=id(module))

    def unshare_students(self) -> int:
        """Give every student its own copy of the teacher's tensors it still shares (before a pass
        that writes weights in place); returns the bytes copied."""
        return sum(unshare(s.module, self.teacher) for s in self.students)

    def restore_teacher(self) -> None:
        """Put back the teacher's requires-grad flags (a trainer freezes the teacher it reads)."""
        for pname, p in self.teacher.named_parameters():
            p.requires_grad_(self.shared.requires_grad.get(pname, p.requires_grad))

    # -- the working student -----------------------------------------------------------------

    def working(self) -> Student:
        """The student the next pass transforms; a copy of the teacher if there is none yet."""
        if not self.students:
            self.students.append(self.new_student("student"))
        return self.students[-1]

    def analysis(self, student: Student | None = None) -> Analysis:
        """Graph IR + coupled groups + blocks + cost of a student (cached until its module changes)."""
        from potstill.ir.capture import analyze

        s = student or self.working()
        key = id(s.module)
        if s._analysis is None or s._analysis_key != key:
            if s._teacher_copy == key:  # an unchanged copy of the teacher: the same graph and groups
                s._analysis = self.teacher_analysis()
            else:
                s._analysis = analyze(s.module, self.example_inputs, self.example_kwargs)
            s._analysis_key = key
        return s._analysis

    def teacher_analysis(self) -> Analysis:
        """The teacher's analysis, computed once for every state that shares this cache."""
        from potstill.ir.capture import analyze

        if self.shared.analysis is None:
            self.shared.analysis = analyze(self.teacher, self.example_inputs, self.example_kwargs)
        return self.shared.analysis

    def run_model(self, model: nn.Module, *, no_grad: bool = True) -> Any:
        ctx = torch.no_grad() if no_grad else torch.enable_grad()
        with ctx:
            return model(*self.example_inputs, **self.example_kwargs)

    # -- instruments ---------------------------------------------------------------------------

    def ir_text(self) -> str:
        return self.analysis().text()
