"""``PassManager``: run passes in order with instruments; a failure names the pass and those before
it (chained with ``from e``, as torch.fx's pass manager does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from potstill.errors import PassError

from .base import Pass, PassResult
from .instruments import PassInstrument

if TYPE_CHECKING:
    from potstill.state import CompileState


class PassManager:
    """Runs passes in order with instruments; a failure names the pass and those before it.

    After each pass it appends the pass's spec to ``state.pipeline`` and to the history of every
    student, so a pass never records itself.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[PassInstrument] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)

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
            state.pipeline.append(spec)
            for student in state.students:
                student.history.append(spec)
            changed_any |= result.changed
            done.append(spec)
        for inst in self.instruments:
            inst.end(state)
        return PassResult(state, changed_any)
