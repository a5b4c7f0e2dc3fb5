"""``PassManager``: run passes in order with instruments; a failure names the pass and those before
it (chained with ``from e``, as torch.fx's pass manager does).

A manager is itself a ``Pass`` (onnx-ir's ``Sequential``), so pipelines nest: a manager inside a
manager runs as one step of the outer one. Its contract is its passes' contracts combined:

* ``requires`` — what each pass requires that no pass before it ``ensures``;
* ``ensures`` — everything its passes ensure;
* ``in_place`` / ``collective`` — true when any of its passes is.

The base class checks that contract around a nested manager's ``run``, as for any pass; each inner
pass still checks its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from potstill.errors import PassError

from .base import NoOptions, Pass, PassResult, Predicate, predicates
from .instruments import PassInstrument

if TYPE_CHECKING:
    from potstill.state import CompileState


class PassManager(Pass):
    """Runs passes in order with instruments; a failure names the pass and those before it.

    After each pass it appends the pass's spec to ``state.pipeline`` and to the history of every
    student, so a pass never records itself; a nested manager's passes are recorded one by one, by
    the nested manager.

    >>> PassManager([PassManager([]), PassManager([])]).spec()
    ''
    """

    name = "pipeline"

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[PassInstrument] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.options = NoOptions()
        self.requires, self.ensures = _contract(self.passes)
        self.in_place = any(p.in_place for p in self.passes)
        self.collective = any(p.collective for p in self.passes)

    def spec(self) -> str:
        """The passes' specs joined: ``build_pipeline(m.spec())`` builds the same passes, flattened."""
        return ",".join(s for s in (p.spec() for p in self.passes) if s)

    def run(self, state: CompileState) -> PassResult:
        done: list[str] = []
        changed_any = False
        for p in self.passes:
            if not all(i.should_run(p, state) for i in self.instruments):
                continue
            for inst in self.instruments:
                inst.before_pass(p, state)
            try:
                result = p(state)
            except Exception as e:
                before = ", ".join(done) if done else "none"
                raise PassError(f"pass '{p.spec()}' failed (passes before it: {before}): {e}") from e
            for inst in self.instruments:
                inst.after_pass(p, state, result)
            state = result.state
            spec = p.spec()
            if not isinstance(p, PassManager):  # a nested manager recorded its passes itself
                state.pipeline.append(spec)
                for student in state.students:
                    student.history.append(spec)
            changed_any |= result.changed
            done.append(spec)
        for inst in self.instruments:
            inst.end(state)
        return PassResult(state, changed_any)


def _contract(passes: Iterable[Pass]) -> tuple[tuple[Predicate, ...], tuple[Predicate, ...]]:
    """``(requires, ensures)`` of passes run in order (see the module docstring)."""
    requires: list[Predicate] = []
    ensures: list[Predicate] = []
    for p in passes:
        requires += [r for r in predicates(p.requires) if r not in ensures and r not in requires]
        ensures += [e for e in predicates(p.ensures) if e not in ensures]
    return tuple(requires), tuple(ensures)
