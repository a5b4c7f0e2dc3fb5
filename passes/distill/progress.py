"""A rich progress bar for training: step M/N, loss, throughput (samples/s), ETA.

Disabled (a no-op) on ranks other than 0 and when ``enabled=False``; rich itself degrades to
plain output when stdout is not a terminal.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any


class StepProgress:
    def __init__(self, total: int, enabled: bool = True, start: int = 0, description: str = "distill") -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task = None
        if enabled:
            # imported here: a headless worker (a GPU box with only torch) never needs rich
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.1f} samples/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, loss=float("nan"), rate=0.0)

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
            fields: dict[str, float] = {"rate": rate}
            if loss is not None:
                fields["loss"] = loss
            self._progress.update(self._task, completed=step, **fields)
