"""Latency tables (lookup, width choice), the roofline fallback, and measuring a table here."""

from __future__ import annotations

from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.profiles import (
    LatencyEntry,
    LatencyTable,
    estimate_ms,
    load_profile,
    op_latency_ms,
    profile_command,
)
from potstill.profiles.measure import default_grid, missing_shapes


def _conv(w: int, ms: float, hw: int = 28) -> LatencyEntry:
    return LatencyEntry(op="conv2d", cin=w, cout=w, kernel=3, hw=hw, groups=1, stride=1, ms=ms)


@pytest.fixture
def table() -> LatencyTable:
    # widths 32..64; 40 and 44 sit on slow shapes (slower than 48), as odd counts do on real CPUs
    rows = [_conv(32, 1.0), _conv(40, 2.4), _conv(44, 2.6), _conv(48, 2.2), _conv(56, 3.0), _conv(64, 4.0),
            LatencyEntry(op="linear", cin=64, cout=64, tokens=16, ms=0.1),
            LatencyEntry(op="linear", cin=128, cout=128, tokens=16, ms=0.3),
            LatencyEntry(op="model", name="resnet18", ms=12.5)]
    return LatencyTable(entries=rows)


def test_lookup_exact_interpolated_and_scaled(table: LatencyTable) -> None:
    assert table.lookup("conv2d", cin=44, cout=44, kernel=3, hw=28) == pytest.approx(2.6)
    # between 56 (work 3136, 3.0 ms) and 64 (work 4096, 4.0 ms): linear in work
    work = 60 * 60
    expected = 3.0 + (4.0 - 3.0) * (work - 56 * 56) / (64 * 64 - 56 * 56)
    assert table.lookup("conv2d", cin=60, cout=60, kernel=3, hw=28) == pytest.approx(expected)
    # hw 56 is 4x the pixels of the measured hw 28
    assert table.lookup("conv2d", cin=64, cout=64, kernel=3, hw=56) == pytest.approx(16.0)
    # above the largest row: in proportion to work; below the smallest: held
    assert table.lookup("conv2d", cin=128, cout=128, kernel=3, hw=28) == pytest.approx(16.0)
    assert table.lookup("conv2d", cin=8, cout=8, kernel=3, hw=28) == pytest.approx(1.0)
    assert table.lookup("linear", cin=96, cout=96, tokens=32) == pytest.approx(2 * (0.1 + 0.2 * (96**2 - 64**2) / (128**2 - 64**2)))
    assert table.lookup("model", name="resnet18") == 12.5
    with pytest.raises(LookupError):
        LatencyTable().lookup("conv2d", cin=1, cout=1)


def test_best_width_never_lands_on_a_slow_shape(table: LatencyTable) -> None:
    assert table.best_width("conv2d", [40, 44, 48], kernel=3, hw=28) == 48
    # 32 and 48 do the most work per ms; 40/44 are slow; the throughput winner is 32 (1024/1.0)
    assert table.best_width("conv2d", [32, 40, 44], kernel=3, hw=28) == 32
    with pytest.raises(ValueError, match="at least one"):
        table.best_width("conv2d", [], hw=28)


def test_roofline_fallback() -> None:
    p = load_profile("cpu")
    assert p.roofline is not None
    flops = p.roofline.peak_flops["fp32"]
    # compute bound: 1 GMAC = 2 GFLOP
    assert estimate_ms(1e9, 1.0, p) == pytest.approx(1e3 * 2e9 / flops)
    # memory bound: 1 GB moved at memory_bandwidth_gbs
    assert estimate_ms(1.0, 1e9, p) == pytest.approx(1e3 / p.roofline.memory_bandwidth_gbs)
    ms, source = op_latency_ms(p, "conv2d", cin=64, cout=64, kernel=3, hw=56)
    assert source == "roofline" and ms > 0
    with pytest.raises(InputError, match="neither a latency table nor roofline"):
        estimate_ms(1.0, 1.0, p.model_copy(update={"roofline": None}))


def test_profile_command_writes_a_table_a_second_run_reads(tmp_path: Path) -> None:
    out = tmp_path / "my-device.yaml"
    written = profile_command("cpu", str(out), quick=True)
    assert written == out and out.is_file()
    first = load_profile(out)
    assert first.name == "my-device" and first.latency_table is not None
    grid = default_grid(quick=True)
    assert missing_shapes(first.latency_table, grid) == []
    assert len(first.latency_table.entries) == len(grid)
    # the table answers lookups (and op_latency_ms says it did)
    ms, source = op_latency_ms(first, "conv2d", cin=24, cout=24, kernel=3, hw=14)
    assert source == "table" and ms > 0
    # second run: reads the written table, measures nothing new (same rows, same numbers)
    profile_command("cpu", str(out), quick=True)
    second = load_profile(out)
    assert second.latency_table == first.latency_table


def test_lookup_prefers_rows_with_the_asked_input_width(table: LatencyTable) -> None:
    # a layer with cin fixed at 64 whose output width is chosen: 44 outputs measured as slow
    rows = [LatencyEntry(op="conv2d", cin=64, cout=c, kernel=3, hw=28, groups=1, stride=1, ms=ms)
            for c, ms in ((32, 1.0), (44, 2.0), (48, 1.5))]
    t = table.merged(rows)
    assert t.lookup("conv2d", cin=64, cout=40, kernel=3, hw=28) == pytest.approx(1.0 + (2.0 - 1.0) * 8 / 12)
    assert t.best_width("conv2d", [40, 44, 48], cin=64, kernel=3, hw=28) == 48


def test_best_width_picks_the_most_work_per_ms() -> None:
    """A table where 24 channels run as fast as 16 (padding to a vector width): 24 does the most work
    per ms; with 24 made slow, the widest of the rest that ties wins."""
    from potstill.profiles.table import LatencyEntry, LatencyTable

    def table(ms: dict[int, float]) -> LatencyTable:
        return LatencyTable(entries=[LatencyEntry(op="conv2d", ms=v, cin=c, cout=c, kernel=3, hw=14, groups=1, stride=1)
                                     for c, v in ms.items()])

    assert table({16: 1.0, 24: 1.0, 32: 4.0}).best_width("conv2d", [16, 24, 32], kernel=3, hw=14) == 24
    assert table({16: 1.0, 24: 9.0, 32: 4.0}).best_width("conv2d", [16, 24, 32], kernel=3, hw=14) == 32
    assert table({16: 1.0, 24: 9.0, 32: 9.0}).best_width("conv2d", [16, 24, 32], kernel=3, hw=14) == 16
