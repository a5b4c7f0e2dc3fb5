"""The compile progress bar: its total is the estimated seconds of every pass and extra step, it is
advanced to exactly that total, and it names the pass running."""

from __future__ import annotations

import io

import pytest
from potstill.pipeline import Pass, PassManager, PassResult
from potstill.progress import MIN_SECONDS, PassProgress, step_seconds
from potstill.state import CompileState
from rich.console import Console
from torch import nn


class _Noop(Pass):
    def run(self, state: CompileState) -> PassResult:
        return PassResult(state, False)


class LowerNoop(_Noop):
    name = "lower.noop"


class ImportanceNoop(_Noop):
    name = "importance.noop"


def test_estimates_scale_with_parameters_and_have_a_floor() -> None:
    assert step_seconds("lower", 100_000_000) == pytest.approx(10 * step_seconds("lower", 10_000_000))
    assert step_seconds("lower", 100_000_000) > step_seconds("importance", 100_000_000)
    assert step_seconds("anything", 10) == MIN_SECONDS


def test_bar_reaches_its_total_and_names_the_pass() -> None:
    plans = [("macs50", [ImportanceNoop(), LowerNoop()]), ("macs25", [ImportanceNoop(), LowerNoop()])]
    sink = io.StringIO()
    progress = PassProgress(plans, params=50_000_000, extra_steps=["lower"],
                            console=Console(file=sink, force_terminal=True, width=120))
    expected = 2 * (step_seconds("importance", 50_000_000) + step_seconds("lower", 50_000_000))
    assert progress.total == pytest.approx(expected + step_seconds("lower", 50_000_000))
    state = CompileState(teacher=nn.Linear(2, 2), example_inputs=())
    with progress:
        for _, passes in plans:
            PassManager(passes, [progress]).run(state)
        assert progress.completed == pytest.approx(expected)
        with progress.step("timing the teacher", "lower"):
            pass
    assert progress.completed == pytest.approx(progress.total)
    assert "timing the teacher" in sink.getvalue() and "ETA" in sink.getvalue()


def test_disabled_bar_still_counts() -> None:
    progress = PassProgress([("s", [LowerNoop()])], params=1_000_000, enabled=False)
    with progress:
        PassManager([LowerNoop()], [progress]).run(CompileState(teacher=nn.Linear(2, 2), example_inputs=()))
    assert progress.completed == pytest.approx(progress.total)
