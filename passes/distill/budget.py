"""A wall-clock budget for training: stop when it is spent, and schedule the learning rate on it.

With a budget of ``B`` seconds, after ``t`` seconds and ``s`` of ``S`` planned steps the run's
progress is

    p = max(s / S, t / B)

which drives the cosine decay (``schedule.cosine_factor``) in place of ``s / S``: a run stopped by
the budget ends at its lowest learning rate, as a run that completes its steps does. Training on
under a budget rather than a fixed number of epochs is how time-to-fidelity is compared
(RS2, Okanovic et al. 2023, arXiv 2306.03398: at equal time, fresh random data per epoch beat
thirty subset-selection methods). The budget counts this process's training time: a resumed run
gets the whole budget again.
"""

from __future__ import annotations

import math
import time

from potstill.errors import InputError


class TimeBudget:
    """``seconds`` of wall clock from ``start()``; ``None`` is no budget (never spent)."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"time budget: expected a positive, finite number of seconds, got {seconds!r}")
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed >= self.seconds

    def fraction(self) -> float:
        """``elapsed / budget`` in [0, 1]; 0 without a budget."""
        return 0.0 if self.seconds is None else min(self.elapsed / self.seconds, 1.0)

    def progress(self, step: int, total: int) -> float:
        """``max(step / total, elapsed / budget)`` in [0, 1]."""
        return min(max(step / total if total > 0 else 0.0, self.fraction()), 1.0)

    def remaining(self) -> float | None:
        return None if self.seconds is None else max(self.seconds - self.elapsed, 0.0)
