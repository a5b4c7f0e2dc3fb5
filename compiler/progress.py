"""A compile's progress with an ETA: one bar over every pass of every student, plus steps outside passes.

The bar counts *estimated seconds*, not passes: a pass of kind ``k`` (the part of its name before
the dot: ``lower``, ``importance``, ``prune``, ``distill``, ...) on a teacher of ``P`` million
parameters is worth ``SECONDS_PER_MPARAM[k] · P`` (with a floor). The factors were fitted to
``bench/scale_llm.py`` (Llama-style decoders, 2 idle cores): lowering dominates, about 0.15 s per
million parameters for export, ONNX Runtime session, parity and timing of one module (the issue's
measurements: 15 s for the two lowerings of a 44M teacher, 66 s for a 331M one). rich's ``TimeRemainingColumn``
divides what is left by the *measured* rate, so on a machine twice as slow as the fit the ETA is
right after the first pass or two.

    progress = PassProgress([(plan.name, plan.passes) for plan in plans], params=teacher_params)
    with progress:
        for plan in plans:
            PassManager(plan.passes, [progress, ...]).run(state)
        with progress.step("timing the teacher", "lower"):
            ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from potstill.pipeline import Pass, PassInstrument, PassResult
from potstill.state import CompileState

#: seconds per million teacher parameters, by pass kind (fitted on the scale bench, 2 cores)
SECONDS_PER_MPARAM = {"lower": 0.15, "importance": 0.05, "prune": 0.04, "bn": 0.05, "record": 0.08,
                      "distill": 1.0, "reconstruct": 0.2}  # fmt: skip
DEFAULT_SECONDS_PER_MPARAM = 0.05
#: no step is estimated under this (imports, small models)
MIN_SECONDS = 0.5


def step_seconds(kind: str, params: int) -> float:
    """Estimated seconds of one step of ``kind`` on a teacher of ``params`` parameters."""
    rate = SECONDS_PER_MPARAM.get(kind, DEFAULT_SECONDS_PER_MPARAM)
    return max(MIN_SECONDS, rate * params / 1e6)


def _kind(p: Pass) -> str:
    return p.name.split(".", 1)[0]


class PassProgress(PassInstrument):
    """A rich progress bar with an ETA over the passes of several plans (and named extra steps)."""

    def __init__(self, plans: Sequence[tuple[str, Sequence[Pass]]], params: int, *, extra_steps: Sequence[str] = (),
                 enabled: bool = True, console: Any = None) -> None:  # fmt: skip
        self.params = params
        self.enabled = enabled
        self.total = sum(step_seconds(_kind(p), params) for _, passes in plans for p in passes)
        self.total += sum(step_seconds(kind, params) for kind in extra_steps)
        self.completed = 0.0
        self._plan_of = {id(p): name for name, passes in plans for p in passes}
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=False,
            )  # fmt: skip
            self._task = self._progress.add_task("compile", total=self.total)

    def __enter__(self) -> PassProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self._progress is not None:
            self._progress.stop()

    def _describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def _advance(self, seconds: float) -> None:
        self.completed += seconds
        if self._progress is not None:
            self._progress.update(self._task, completed=min(self.completed, self.total))

    def before_pass(self, p: Pass, state: CompileState) -> None:
        plan = self._plan_of.get(id(p))
        self._describe(f"{plan}: {p.spec()}" if plan else p.spec())

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        self._advance(step_seconds(_kind(p), self.params))

    @contextlib.contextmanager
    def step(self, description: str, kind: str) -> Iterator[None]:
        """A step outside the passes (the teacher's lowering, writing students), counted as ``kind``."""
        self._describe(description)
        try:
            yield
        finally:
            self._advance(step_seconds(kind, self.params))
