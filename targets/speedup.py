"""Speed-ups measured against the teacher's engine, on this host, now.

Every student's speed-up in the manifest (``interleaved_speedup``, from the ``record`` pass) and
every relative budget (``--speedup S``: S× faster than the teacher) is measured here. Every engine
is timed interleaved with the teacher's engine in one process (``potstill.targets.timing.time_rounds``): round ``r`` runs both for a few calls, alternating which
goes first, and gives the speed-up of that round

    q_r = median(t_teacher, r) / median(t_candidate, r).

Load that comes and goes between rounds hits both engines of a round alike, so ``q_r`` is steadier
than either time (an absolute budget set on a quiet machine fails on a busy one; a ratio does not).
The measured speed-up is ``q = median_r q_r`` and its spread the interquartile range
``[q_25, q_75]``. A candidate meets ``S`` within the tolerance ``τ`` when ``q ≥ S·(1 − τ)``.

The verdict is *decided* when the whole interquartile range lies on one side of ``S·(1 − τ)``;
otherwise rounds are added, up to ``max_rounds``. If the range still straddles the threshold the
host was too noisy to decide: the verdict falls to the median and is flagged. The measurement is
bounded whatever the load: at most ``max_rounds`` rounds per engine, and the search times a fixed
number of engines (``SearchSettings.extra_tries``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.errors import InputError

#: relative interquartile spread of the per-round speed-ups above which a reading counts as noisy
NOISY_SPREAD = 0.25


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@dataclass(frozen=True)
class SpeedupReading:
    """One engine timed against the teacher: per-round speed-ups and the times behind them."""

    speedups: tuple[float, ...]
    teacher_ms: float
    ms: float
    threshold: float | None

    @property
    def speedup(self) -> float:
        return statistics.median(self.speedups)

    @property
    def iqr(self) -> tuple[float, float]:
        return _quartiles(self.speedups)

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median."""
        lo, hi = self.iqr
        return (hi - lo) / self.speedup if self.speedup > 0 else float("inf")

    @property
    def decided(self) -> bool:
        """Whether the whole interquartile range lies on one side of the threshold (no threshold:
        whether the spread is below ``NOISY_SPREAD``)."""
        if self.threshold is None:
            return self.spread <= NOISY_SPREAD
        lo, hi = self.iqr
        return lo >= self.threshold or hi < self.threshold

    @property
    def meets(self) -> bool:
        return self.threshold is None or self.speedup >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.iqr
        return {"speedup": self.speedup, "speedup_iqr": [lo, hi], "spread": self.spread, "rounds": len(self.speedups),
                "teacher_ms": self.teacher_ms, "ms": self.ms, "threshold": self.threshold, "decided": self.decided}


class TeacherClock:
    """Times engines against the teacher's, interleaved, within a bounded number of rounds.

    >>> clock = TeacherClock(lambda: None, min_rounds=3, max_rounds=6)      # doctest: +SKIP
    >>> clock.read(student_engine, threshold=1.9).meets                     # doctest: +SKIP
    """

    def __init__(self, teacher: Callable[[], Any], *, min_rounds: int = 5, max_rounds: int = 15,
                 per_round: int = 5, warmup: int = 2) -> None:
        if not 1 <= min_rounds <= max_rounds:
            raise ValueError(f"timing rounds: need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
        self.teacher = teacher
        self.min_rounds, self.max_rounds, self.per_round, self.warmup = min_rounds, max_rounds, per_round, warmup
        #: rounds and engines timed so far (the bound the search keeps)
        self.rounds = 0
        self.engines = 0
        self.readings: list[SpeedupReading] = []

    def read(self, engine: Callable[[], Any], threshold: float | None = None) -> SpeedupReading:
        """Time ``engine`` against the teacher: ``min_rounds``, then more until the verdict against
        ``threshold`` is decided or ``max_rounds`` are spent."""
        from potstill.targets.timing import time_rounds

        fns = {"teacher": self.teacher, "engine": engine}
        times = time_rounds(fns, self.min_rounds, self.per_round, self.warmup)
        reading = self._reading(times, threshold)
        while not reading.decided and len(reading.speedups) < self.max_rounds:
            more = time_rounds(fns, min(2, self.max_rounds - len(reading.speedups)), self.per_round, warmup=0,
                               first_round=len(reading.speedups))
            for k in times:
                times[k] += more[k]
            reading = self._reading(times, threshold)
        self.rounds += len(reading.speedups)
        self.engines += 1
        self.readings.append(reading)
        return reading

    @staticmethod
    def _reading(times: dict[str, list[float]], threshold: float | None) -> SpeedupReading:
        q = tuple(t / e for t, e in zip(times["teacher"], times["engine"]) if e > 0)
        if not q:
            raise InputError("timing against the teacher: the engine reported no time")
        return SpeedupReading(q, statistics.median(times["teacher"]), statistics.median(times["engine"]), threshold)

    def summary(self) -> dict[str, Any]:
        """Rounds and engines spent, the teacher's time, and whether any verdict was too noisy."""
        undecided = [r for r in self.readings if not r.decided]
        return {"engines_timed": self.engines, "rounds": self.rounds, "max_rounds_per_engine": self.max_rounds,
                "teacher_ms": statistics.median([r.teacher_ms for r in self.readings]) if self.readings else None,
                "max_spread": max((r.spread for r in self.readings), default=0.0),
                "too_noisy": len(undecided)}


def interleaved_speedup(teacher_art: Any, teacher: Any, art: Any, module: Any, example_inputs: tuple[Any, ...],
                        example_kwargs: dict[str, Any], profile: Any) -> tuple[SpeedupReading | None, str | None]:
    """The student's engine ``art`` timed interleaved with the teacher's ``teacher_art``, and a note
    when it was not: None unless both are ONNX Runtime engines (the others are timed out of process
    and keep the ratio of their separate medians), and None, said, when the two sessions together
    would take more than half the memory still free (a large decoder's compile must not grow its
    peak for a timing)."""
    if not (_in_process(teacher_art) and _in_process(art)):
        return None, None
    from potstill.inputs.memory import GB, available_bytes

    need = _engine_bytes(teacher_art) + _engine_bytes(art)
    free = available_bytes()
    if 2 * need > free:
        return None, (f"speed-up from the two medians, timed apart: the teacher's and the student's engines "
                      f"({need / GB:.1f} GB) would take more than half of the {free / GB:.1f} GB free to time "
                      "them interleaved")  # fmt: skip
    try:
        clock = TeacherClock(engine_callable(teacher_art, teacher, example_inputs, example_kwargs, profile))
        return clock.read(engine_callable(art, module, example_inputs, example_kwargs, profile)), None
    except Exception as e:  # a measurement after the work is done: the two medians stand, and it is said
        return None, f"speed-up from the two medians, timed apart: timing it interleaved failed ({type(e).__name__}: {e})"


def _engine_bytes(art: Any) -> int:
    """The engine's files on disk (the ONNX graph and its external weights): about what a session
    holds in memory."""
    return sum(Path(f).stat().st_size for f in {Path(v) for v in art.files.values()} if Path(f).is_file())


def _in_process(art: Any) -> bool:
    return art is not None and art.target in ("onnx", "onnxruntime") and art.files.get("onnx") is not None


def engine_callable(art: Any, module: Any, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any],
                    profile: Any) -> Callable[[], Any]:
    """A no-argument call of the lowered engine ``art`` on the example inputs (ONNX Runtime engines;
    other runtimes are timed out of process, so they cannot be interleaved here)."""
    if not _in_process(art):
        raise InputError(
            f"a speed-up budget times engines against the teacher's in this process; the {profile.name} "
            f"engine ({getattr(art, 'target', 'none')}) cannot be: use an ONNX Runtime profile for --speedup, "
            "or give --latency-ms with a profile that has a measured latency table"
        )
    from potstill.targets.onnx_export import OnnxExport, flat_spec
    from potstill.targets.onnxruntime import OrtRunner, fixed_batch, make_session

    path = Path(art.files["onnx"])
    session, _ = make_session(path, profile)
    inputs = fixed_batch(example_inputs, example_kwargs, profile.batch)
    runner = OrtRunner(session, OnnxExport(Path(path), flat_spec(module, *inputs), "potstill"))
    feeds = runner.feeds(inputs)
    output = [session.get_outputs()[0].name]
    return lambda: session.run(output, feeds)
