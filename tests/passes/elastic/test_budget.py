"""Speed-up budgets: the verdict rule on known per-round speed-ups, the bounded clock, and a search
that meets a relative budget by measurement while a busy-loop process loads the CPU."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.elastic import make_supernet
from potstill.passes.elastic.search import SearchSettings, search
from potstill.profiles import load_profile
from potstill.targets.speedup import NOISY_SPREAD, SpeedupReading, TeacherClock

from .conftest import TinyCNN, randomize_bn


def _reading(speedups: list[float], threshold: float | None) -> SpeedupReading:
    return SpeedupReading(tuple(speedups), teacher_ms=1.0, ms=1.0 / sorted(speedups)[len(speedups) // 2],
                          threshold=threshold)


def test_the_verdict_is_decided_only_when_the_spread_lies_on_one_side() -> None:
    steady = _reading([2.0, 2.1, 2.05, 2.1, 2.0], threshold=1.9)
    assert steady.meets and steady.decided and steady.speedup == pytest.approx(2.05)
    below = _reading([1.5, 1.6, 1.55, 1.5, 1.6], threshold=1.9)
    assert not below.meets and below.decided
    # quartiles 1.7 .. 2.1 straddle 1.9: the median says yes, but the host was too noisy to decide
    noisy = _reading([1.5, 1.7, 1.95, 2.1, 2.6], threshold=1.9)
    assert noisy.meets and not noisy.decided
    assert noisy.iqr == (1.7, 2.1) and noisy.spread == pytest.approx(0.4 / 1.95)
    # without a threshold (anchors) the spread alone decides
    assert _reading([1.0, 1.0, 1.01], None).decided
    assert not _reading([1.0, 2.0, 3.0, 0.5], None).decided and NOISY_SPREAD < 1.0


def test_the_clock_adds_rounds_only_to_decide_and_never_past_its_bound() -> None:
    calls = {"teacher": 0, "engine": 0}
    rng = random.Random(0)

    def teacher() -> None:
        calls["teacher"] += 1

    def jittery() -> None:  # wildly varying work: its per-round ratio straddles any threshold near 1
        calls["engine"] += 1
        sum(range(rng.choice([10, 20000])))

    clock = TeacherClock(teacher, min_rounds=3, max_rounds=7, per_round=2, warmup=1)
    reading = clock.read(jittery, threshold=1.0)
    assert 3 <= len(reading.speedups) <= 7
    assert calls["engine"] == 1 + 2 * len(reading.speedups)  # warm-up once, then per_round per round
    clock.read(teacher, threshold=None)
    summary = clock.summary()
    assert summary["engines_timed"] == 2 and summary["rounds"] <= 2 * 7
    assert summary["rounds"] == sum(len(r.speedups) for r in clock.readings)
    assert 0 <= summary["too_noisy"] <= 2 and math.isfinite(summary["max_spread"])
    with pytest.raises(ValueError, match="min_rounds"):
        TeacherClock(teacher, min_rounds=5, max_rounds=3)


X = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_a_speedup_budget_is_met_by_measurement_under_a_busy_loop(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = randomize_bn(TinyCNN(c=16, hidden=32))
    import copy

    net = make_supernet(copy.deepcopy(teacher), (X[:1],), batches=[X[:32]])
    settings = SearchSettings(students=2, speedup=(2.0,), population=8, generations=2, timing_rounds=3,
                              max_timing_rounds=6, extra_tries=2)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        assert busy.poll() is None  # the load runs for the whole search
        result = search(net, teacher, load_profile("cpu"), (X[:1],), {}, [X[32:]], [X[:32]], settings,
                        work_dir=tmp_path / "search")
        assert busy.poll() is None
    finally:
        busy.kill()
        busy.wait()
    t = result.timing
    # bounded: the teacher, two anchors, at most students + extra_tries finalists, each within its rounds
    assert t["mode"] == "speedup" and t["front_points_timed"] <= t["max_front_points_timed"] == 4
    assert t["engines_timed"] == 2 + t["front_points_timed"]
    assert t["rounds"] <= t["engines_timed"] * t["max_rounds_per_engine"]
    # noise is reported, as a number and as a count of verdicts too noisy to decide
    assert math.isfinite(t["max_spread"]) and t["max_spread"] >= 0 and t["too_noisy"] >= 0
    assert t["teacher_ms"] > 0
    assert result.finalists, result.rejected
    for f in result.finalists:
        timing = f.timing
        assert timing is not None and timing["threshold"] == pytest.approx(2.0 * 0.95)
        assert timing["speedup"] >= timing["threshold"]  # met by measurement against the teacher
        assert 3 <= timing["rounds"] <= 6 and isinstance(timing["decided"], bool)
        assert timing["ms"] > 0 and timing["teacher_ms"] > 0
    for r in result.rejected:
        assert "speed-up" in r["why"] and r["timing"]["speedup"] < r["timing"]["threshold"]


def test_an_absolute_budget_needs_a_measured_table() -> None:
    torch.manual_seed(0)
    teacher = randomize_bn(TinyCNN())
    net = make_supernet(teacher, (X[:1, :, :8, :8],), batches=[X[:8, :, :8, :8]])
    with pytest.raises(InputError, match="measured latency table"):
        search(net, teacher, load_profile("cpu"), (X[:1, :, :8, :8],), {}, [X[:8, :, :8, :8]], [X[:8, :, :8, :8]],
               SearchSettings(latency_ms=5.0))
