"""The channel multiple read off measured widths: staircases of lanes against smooth or flat costs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from potstill.profiles import LatencyEntry, LatencyTable, load_profile, profile_command
from potstill.profiles.measure import LANES, alignment_grid, measured_channel_multiple


def _series(cost: list[float], widths: range, op: str = "conv2d") -> list[LatencyEntry]:
    if op == "conv2d":
        return [LatencyEntry(op="conv2d", cin=64, cout=w, kernel=3, hw=28, groups=1, stride=1, ms=ms)
                for w, ms in zip(widths, cost, strict=True)]
    return [LatencyEntry(op="linear", cin=768, cout=w, tokens=256, ms=ms) for w, ms in zip(widths, cost, strict=True)]


def _table(*rows: list[LatencyEntry]) -> LatencyTable:
    return LatencyTable(threads=2, entries=[r for series in rows for r in series])


def _staircase(lane: int, widths: range, noise: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    # a fixed cost plus 0.01 per lane started, with noise of ``noise`` times that step
    return [0.05 + 0.01 * (math.ceil(w / lane) + noise * rng.standard_normal()) for w in widths]


@settings(max_examples=40, deadline=None)
@given(lane=st.sampled_from(LANES), seed=st.integers(0, 10_000))
def test_a_lane_staircase_reads_as_its_lane(lane: int, seed: int) -> None:
    widths = range(32, 65)
    reading = measured_channel_multiple(_table(_series(_staircase(lane, widths, 0.1, seed), widths)))
    assert reading.multiple == lane, reading.describe()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), op=st.sampled_from(["conv2d", "linear"]))
def test_time_that_follows_the_channel_count_reads_as_no_lane(seed: int, op: str) -> None:
    widths = range(224, 257) if op == "linear" else range(32, 65)
    rng = np.random.default_rng(seed)
    cost = [(0.05 + 0.002 * w) * (1 + 0.01 * rng.standard_normal()) for w in widths]
    assert measured_channel_multiple(_table(_series(cost, widths, op))).multiple == 1


def test_flat_or_scattered_rows_measure_nothing() -> None:
    widths = range(32, 65)
    flat = _series([0.08] * len(widths), widths)
    assert measured_channel_multiple(_table(flat)).multiple is None
    # the default grid's widths sit 8 to 64 apart: they cannot show a lane
    sparse = [LatencyEntry(op="conv2d", cin=w, cout=w, kernel=3, hw=28, groups=1, stride=1, ms=0.01 * w)
              for w in (16, 24, 32, 48, 64, 96, 128, 160)]
    reading = measured_channel_multiple(_table(sparse))
    assert reading.multiple is None and reading.series == {}


def test_the_widest_lane_any_series_shows_wins() -> None:
    convs, linears = range(32, 65), range(224, 257)
    smooth = [0.1 + 0.002 * w for w in linears]
    # a row of the same series far from the run (the default grid's square shapes) is left out of it
    apart = _series([0.9], range(128, 129))
    reading = measured_channel_multiple(_table(_series(_staircase(8, convs, 0.0, 0), convs), apart,
                                               _series(smooth, linears, "linear")))
    assert reading.multiple == 8 and sorted(reading.series.values()) == [1, 8]


def test_the_alignment_grid_runs_one_channel_apart() -> None:
    grid = alignment_grid()
    couts = sorted(s["cout"] for s in grid if s["op"] == "conv2d" and s["kernel"] == 3)
    assert np.all(np.diff(couts) == 1) and len(couts) > 2 * max(LANES)


@pytest.mark.parametrize("lane", [4, 16])
def test_profile_writes_the_measured_multiple(tmp_path: Path, lane: int, capsys: pytest.CaptureFixture[str]) -> None:
    # an earlier run left a width series in the output; a quick run keeps it and reads the lane off it
    out = tmp_path / "dev.yaml"
    widths = range(32, 65)
    seeded = load_profile("cpu").model_copy(update={"latency_table": _table(_series(_staircase(lane, widths, 0.0, 1),
                                                                                    widths))})
    from potstill.profiles import write_profile

    write_profile(seeded, out)
    profile_command("cpu", str(out), quick=True)
    written = load_profile(out)
    assert written.channel_multiple == lane
    assert f"channel_multiple {lane} (measured" in out.read_text()
    assert f"channel multiple: {lane}, measured" in capsys.readouterr().err


def test_a_quick_profile_keeps_the_base_multiple_and_says_so(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.yaml"
    profile_command("cpu", str(out), quick=True)
    assert load_profile(out).channel_multiple == load_profile("cpu").channel_multiple
    assert "run without --quick to measure it" in capsys.readouterr().err
