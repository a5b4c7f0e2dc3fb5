"""Instruments: hooks before and after each pass (TVM's ``PassInstrument``).

Timing, IR dumps, verification and skipping live here, never inside passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import Pass, PassResult

if TYPE_CHECKING:
    from potstill.state import CompileState


class PassInstrument:
    """Hooks around each pass. Timing, dumps and verification live here, never in passes."""

    def should_run(self, p: Pass, state: CompileState) -> bool:
        return True

    def before_pass(self, p: Pass, state: CompileState) -> None:
        return None

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        return None

    def end(self, state: CompileState) -> None:
        return None


@dataclass
class TimingInstrument(PassInstrument):
    """Records wall time per pass; ``table()`` renders it for the console."""

    times: list[tuple[str, float, bool]] = field(default_factory=list)
    _t0: float = 0.0

    def before_pass(self, p: Pass, state: CompileState) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        self.times.append((p.spec(), time.perf_counter() - self._t0, result.changed))

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="passes")
        t.add_column("pass")
        t.add_column("seconds", justify="right")
        t.add_column("changed")
        for name, sec, changed in self.times:
            t.add_row(name, f"{sec:.2f}", "yes" if changed else "no")
        return t


@dataclass
class SkipInstrument(PassInstrument):
    """Skips the named passes."""

    skip: frozenset[str] = frozenset()

    def should_run(self, p: Pass, state: CompileState) -> bool:
        return p.name not in self.skip


@dataclass
class DumpIRInstrument(PassInstrument):
    """Writes the working model's IR text before each pass and after it when it changed."""

    directory: Any = None
    _count: int = 0

    def _dump(self, state: CompileState, tag: str) -> None:
        from pathlib import Path

        from potstill.outputs.atomic import atomic_write_text

        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / f"{self._count:02d}-{tag}.txt", state.ir_text())

    def before_pass(self, p: Pass, state: CompileState) -> None:
        self._count += 1
        self._dump(state, f"before-{p.name}")

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if result.changed:
            self._dump(result.state, f"after-{p.name}")


@dataclass
class VerifyInstrument(PassInstrument):
    """Runs the IR verifier (``check``, default ``verify.verify_student``) after every pass that
    changed the working model."""

    check: Callable[[CompileState], None] | None = None

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if not result.changed:
            return
        if self.check is None:
            from potstill.ir.verify import verify_student

            self.check = verify_student
        self.check(result.state)
