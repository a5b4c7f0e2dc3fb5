"""A rich progress bar for training: step M/N, loss, throughput (samples/s), ETA.

Under a wall-clock budget the bar fills with ``max(steps done / planned, time spent / budget)`` and
the ETA is the sooner of the budget's end and the planned steps' end at the current pace.
Disabled (a no-op) on ranks other than 0 and when ``enabled=False``; rich itself degrades to
plain output when stdout is not a terminal.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

#: the bar's resolution under a time budget (it counts thousandths of the run)
_SCALE = 1000


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0.0) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StepProgress:
    def __init__(self, total: int, enabled: bool = True, start: int = 0, description: str = "distill",
                 budget_s: float | None = None) -> None:  # fmt: skip
        self.enabled, self.total, self.budget_s, self.start_step = enabled, total, budget_s, start
        self.t0 = time.perf_counter()
        self._progress: Any = None
        self._task = None
        if enabled:
            # imported here: a headless worker (a GPU box with only torch) never needs rich
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[steps]}"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.1f} samples/s"),
                TextColumn("ETA {task.fields[eta]}"),
                transient=False,
            )
            self._task = self._progress.add_task(
                description if budget_s is None else f"{description} (budget {_clock(budget_s)})",
                total=_SCALE, completed=self._fraction(start) * _SCALE, loss=float("nan"), rate=0.0,
                steps=self._steps(start), eta="?",
            )  # fmt: skip

    def _steps(self, step: int) -> str:
        return f"step {step}" if self.budget_s is not None else f"{step}/{self.total}"

    def _fraction(self, step: int) -> float:
        f = step / self.total if self.total > 0 else 1.0
        if self.budget_s is not None:
            f = max(f, (time.perf_counter() - self.t0) / self.budget_s)
        return min(f, 1.0)

    def eta(self, step: int) -> float | None:
        """Seconds left: the planned steps at the pace so far, capped by the budget's end."""
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        left = (self.total - step) * elapsed / done if done > 0 else None
        if self.budget_s is not None:
            budget_left = max(self.budget_s - elapsed, 0.0)
            left = budget_left if left is None else min(left, budget_left)
        return left

    def __enter__(self) -> StepProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float | None, rate: float) -> None:
        """Advance to ``step``; ``loss`` None keeps the last shown value (no device sync needed)."""
        if self._progress is not None and self._task is not None:
            eta = self.eta(step)
            fields: dict[str, Any] = {"rate": rate, "steps": self._steps(step), "eta": "?" if eta is None else _clock(eta)}
            if loss is not None:
                fields["loss"] = loss
            self._progress.update(self._task, completed=self._fraction(step) * _SCALE, **fields)
